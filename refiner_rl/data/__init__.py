"""Triplet data: loading, validation, batching, and the synthetic set of the embedded default."""

from refiner_rl.data.records import (
    BucketBatchOrderSampler,
    RecordError,
    TripletDataset,
    collate_triplets,
    load_records,
    validate_records,
)
from refiner_rl.data.synthetic import synthetic_records, write_synthetic_dataset

__all__ = [
    "BucketBatchOrderSampler",
    "RecordError",
    "TripletDataset",
    "collate_triplets",
    "load_records",
    "synthetic_records",
    "validate_records",
    "write_synthetic_dataset",
]
