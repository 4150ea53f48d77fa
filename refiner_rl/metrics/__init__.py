"""Evaluation metrics: pure masked pixel metrics (:mod:`refiner_rl.metrics.masked`) and metric plug-ins, one per
file, on the :class:`refiner_rl.metrics.base.Metric` interface."""
