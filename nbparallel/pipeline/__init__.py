"""Pipeline (model) parallelism: stages on engines, micro-batches flowing between them.

:mod:`nbparallel.pipeline.schedule` is the pure part (schedules as plain data, validation, simulation,
bubble math); it imports neither ipyparallel nor NumPy, so it can be used and tested without a cluster.
"""
