"""Many gateway replicas on Ray Serve: an ingress that routes each request to a replica (adapter
affinity through Serve's model multiplexing), and replicas that each run the whole gateway app
in-process on their own device. Imported only when ``replicas >= 2`` (or by ``serve run``)."""
