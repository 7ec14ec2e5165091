"""The private API: the only component that touches the database, the blob store and the
publishing side of the task queue; the public API and the job consumers go through it."""
