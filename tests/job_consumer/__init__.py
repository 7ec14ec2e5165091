"""Tests of the job consumer: runner, workspace, private API client and the consumer loop."""
