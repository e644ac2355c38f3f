"""The embedding cache served to Ray actors from the driver's node.

The cache file lives in the driver's `[paths] state_dir`, which a Ray node
elsewhere in the cluster does not have. So actors do not open the file: one
`CacheService` actor, placed on the driver's node and reserving no CPU, opens
it read-only, and each embedding actor sends it the texts of a batch through
a `RemoteCacheReader`. The replies (embeddings, found flags and token counts)
travel through Ray's object store, about 1.5 KB per cached row.
"""

from __future__ import annotations


class CacheService:
    """Read-only cache lookups for the embedding actors, run as a Ray actor."""

    def __init__(self, spec) -> None:
        self.reader = spec.open_reader()

    def lookup_with_tokens(self, texts: list[str]):
        return self.reader.lookup_with_tokens(texts)


class RemoteCacheReader:
    """The `CacheReader` methods that `classify_batch` calls, served by a `CacheService`."""

    def __init__(self, service) -> None:
        self.service = service

    def lookup_with_tokens(self, texts: list[str]):
        import ray

        return ray.get(self.service.lookup_with_tokens.remote(texts))

    def close(self) -> None:
        pass


def start_cache_service(spec):
    """Start a `CacheService` for `spec` on this process's Ray node and return its handle.

    It reserves no CPU, so it cannot hold up the read tasks or the embedding
    actors, and Ray restarts it and retries a lookup if its process dies.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    service = ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(
        CacheService
    )
    placement = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return service.options(scheduling_strategy=placement).remote(spec)
