"""The front-ends that feed an engine rows: the batch job, the Ray job and the HTTP server.

All three share one row contract (:mod:`pauserec.frontends.rows`): what a row is (a user id and a
history of external item ids, optionally ``exclude`` / ``allow`` item lists), what a bad row gets (a
record with the reason, the same words everywhere) and what stops the work (anything that is not the
row's fault). They sit above :mod:`pauserec.runtime`, which keeps the engine, the search and the kernels.

- :mod:`pauserec.frontends.batch`: ``pauserec recommend`` over JSONL/Parquet, crash-safe and resumable;
- :mod:`pauserec.frontends.ray_job`: the same job on a Ray cluster;
- :mod:`pauserec.frontends.server`: ``pauserec serve``, online requests with dynamic batching.
"""
