"""daguerre.cluster: the online Serve application and cluster manifests (see README)."""
