"""Running beyond one device: the mesh and its one axis-rules table, sharded models, pod flags and the
memory plan of a pod run (``radial-jax plan``)."""
