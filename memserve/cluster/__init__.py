"""`memserve cluster`: replicas of memserve on one shared Redis store, behind Envoy, on one
machine (docs/cluster.md). Importing this package loads nothing heavy: the command line
builds its parser from it on every `memserve` run."""
