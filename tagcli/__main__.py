from tagcli.cli import main

main()
