"""Triplet and mask-guided task data: loading, validation, decoding, batching, and the synthetic set of the embedded default."""

from refiner_rl.data.images import decode_image, load_image
from refiner_rl.data.records import (
    BucketBatchOrderSampler,
    RecordError,
    TripletDataset,
    collate_triplets,
)
from refiner_rl.data.sources import RecordSource, load_records
from refiner_rl.data.synthetic import mask_task_records, synthetic_records, write_records, write_synthetic_dataset
from refiner_rl.data.validation import ValidationReport, validate_records

__all__ = [
    "BucketBatchOrderSampler",
    "RecordError",
    "RecordSource",
    "TripletDataset",
    "ValidationReport",
    "collate_triplets",
    "decode_image",
    "load_image",
    "load_records",
    "mask_task_records",
    "synthetic_records",
    "validate_records",
    "write_records",
    "write_synthetic_dataset",
]
