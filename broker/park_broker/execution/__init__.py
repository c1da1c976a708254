"""Running jobs: the executor interface, the local process pool and its workers, and the Dask executor."""
