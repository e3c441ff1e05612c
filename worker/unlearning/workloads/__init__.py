"""Built-in workloads (registered under the ``lethe.workloads`` entry-point group)."""
