"""StreamingDataset over megadiff's MDS shards, one disjoint slice per rank, resumable
mid-epoch through `StreamingDataLoader.state_dict()`."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from megadiff.config import DataConfig
from megadiff.data.schema import ShardSetInfo


def shard_location(data: DataConfig) -> tuple[str, str | None]:
    """(local, remote) for StreamingDataset. A remote path on a shared filesystem is cached in
    a node-local directory unless `data.local` names one."""
    if data.remote is None:
        return data.local, None
    if data.local is not None:
        return data.local, data.remote
    digest = hashlib.sha1(data.remote.encode()).hexdigest()[:12]
    return str(Path(tempfile.gettempdir()) / "megadiff-streaming" / digest), data.remote


def read_shard_info(data: DataConfig) -> ShardSetInfo | None:
    """The schema of a shard set on a filesystem path (None for object-store URLs)."""
    where = data.remote if data.remote is not None else data.local
    if "://" in where:
        return None
    return ShardSetInfo.read(where)


def _indexed_dataset_class():
    from streaming import StreamingDataset

    class IndexedStreamingDataset(StreamingDataset):
        """Adds `sample_index` (the sample's global index in the shard set) to every sample, so
        a run can record exactly which samples each step consumed."""

        def get_item(self, sample_id: int, retry: int = 7):
            return {**super().get_item(sample_id, retry), "sample_index": sample_id}

    return IndexedStreamingDataset


def make_train_loader(data: DataConfig, seed: int):
    from streaming import StreamingDataLoader

    local, remote = shard_location(data)
    dataset = _indexed_dataset_class()(local=local, remote=remote, shuffle=data.shuffle,
                               shuffle_seed=seed, batch_size=data.micro_batch_size,
                               num_canonical_nodes=data.num_canonical_nodes)
    return StreamingDataLoader(dataset, batch_size=data.micro_batch_size, drop_last=True,
                               num_workers=data.num_workers,
                               persistent_workers=data.num_workers > 0)
