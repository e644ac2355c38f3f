"""Thirty rows of text with nothing to do with machine learning, for drift tests.

Cooking recipes and football match reports, written for these tests.
"""

RECIPES = [
    ("Slow-cooked beef stew", "Brown the beef in batches, add onions, carrots and red wine, then simmer for three hours until tender."),
    ("Lemon drizzle cake", "Cream butter and sugar, fold in flour and lemon zest, bake for forty minutes and pour over a sugar and lemon syrup."),
    ("Classic margherita pizza", "Stretch the dough thin, spread crushed tomatoes, tear over fresh mozzarella and bake in a very hot oven with basil."),
    ("Vegetable curry with chickpeas", "Fry onion, garlic and ginger, stir in curry paste, coconut milk, chickpeas and spinach, and serve with rice."),
    ("Homemade sourdough bread", "Feed the starter the night before, mix flour, water and salt, fold the dough every hour and bake in a covered pot."),
    ("Roast chicken with garlic", "Rub the chicken with butter, stuff it with lemon and garlic, roast for ninety minutes and rest before carving."),
    ("Chocolate chip cookies", "Beat butter with brown sugar, add eggs and vanilla, mix in flour and chocolate chips, and bake for twelve minutes."),
    ("Mushroom risotto", "Toast arborio rice in butter, add stock one ladle at a time, stir in fried mushrooms and finish with parmesan."),
    ("Pancakes for breakfast", "Whisk flour, milk and eggs into a smooth batter, fry thin pancakes in a hot pan and serve with maple syrup."),
    ("Tomato and basil soup", "Roast tomatoes with garlic and olive oil, blend with vegetable stock and fresh basil, and season with pepper."),
    ("Apple crumble", "Slice apples with cinnamon and sugar, cover with a crumble of flour, oats and butter, and bake until golden."),
    ("Grilled salmon with dill", "Marinate salmon fillets in lemon juice and dill, grill skin side down for six minutes and serve with potatoes."),
    ("Spaghetti carbonara", "Cook spaghetti, fry pancetta, toss with egg yolks and pecorino off the heat so the sauce turns creamy."),
    ("Banana bread", "Mash ripe bananas, mix with melted butter, sugar, eggs and flour, and bake in a loaf tin for an hour."),
    ("Thai green curry", "Simmer chicken in coconut milk with green curry paste, fish sauce, bamboo shoots and Thai basil leaves."),
]

FOOTBALL = [
    ("United edge a late winner at home", "A header in the ninetieth minute gave the hosts a two-one victory after the visitors had equalised from a penalty."),
    ("Derby ends goalless in heavy rain", "Both goalkeepers made fine saves as the local rivals shared the points on a waterlogged pitch."),
    ("Striker scores a hat-trick in cup tie", "The centre forward scored three times before half-time as the league leaders cruised into the quarter-finals."),
    ("Red card changes the game", "The visitors lost their captain to a second yellow card and conceded twice in the final fifteen minutes."),
    ("Promoted side stun the champions", "A deflected free kick and a counter-attack goal sealed a famous away win for the newly promoted club."),
    ("Manager sacked after five defeats", "The board dismissed the head coach on Monday with the team sitting in the relegation places."),
    ("Penalty shoot-out decides the final", "After a one-one draw and extra time, the keeper saved two spot kicks to lift the trophy for his club."),
    ("Winger signs a four-year contract", "The club confirmed the transfer of the young winger for an undisclosed fee after he passed his medical."),
    ("Late own goal hands the visitors a point", "A defender turned a low cross into his own net in stoppage time to make it two apiece."),
    ("Captain injured in training", "The midfielder will miss six weeks with a hamstring strain, ruling him out of the next league fixtures."),
    ("Title race goes to the final day", "Both clubs won their weekend matches, so the league title will be decided on the last afternoon of the season."),
    ("Goalkeeper keeps a clean sheet on debut", "The eighteen-year-old made five saves as his side beat the away team three-nil in front of a full stadium."),
    ("Fans protest over ticket prices", "Supporters held up banners in the seventeenth minute to protest against the rise in season ticket prices."),
    ("Comeback from three goals down", "Trailing three-nil at half-time, the home side scored four times after the break to win a thrilling match."),
    ("Referee under fire after offside call", "Replays showed the winning goal should have been disallowed, and the losing manager criticised the officials."),
]

OFFTOPIC_ROWS = [
    {"id": f"offtopic-{number}", "title": title, "description": description}
    for number, (title, description) in enumerate(RECIPES + FOOTBALL, start=1)
]
