"""Measurement tools: an engine microbenchmark, an HTTP load generator and an HTML report.

    stats      latency histogram (log buckets) and exact percentiles of small samples
    model      ``tinyserve bench model``: ONNX Runtime per batch size and thread count
    client     HTTP/1.1 over raw asyncio streams: targets, request bodies, connections
    scrape     the server's Prometheus ``/metrics``: snapshots and their deltas
    loadgen    ``tinyserve bench http``: closed-loop and open-loop (scheduled) load
    report     rich tables and the self-contained HTML report
    noop       a trivial HTTP server to measure the load generator's own capacity

Importing this package imports none of them.
"""
