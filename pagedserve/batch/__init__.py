"""Document pipelines: files of requests run as batches (issue 26).

- `lines`: the JSONL line formats (OpenAI's Batch API and vLLM's `run-batch`), validated up front.
- `executor`: where a line runs: the server's own app in-process (no socket), or a running server
  or gateway by URL.
- `runner`: runs the lines of one batch with bounded concurrency, skipping those already done.
- `store`: files on disk, batch state and every finished line in SQLite (SQLAlchemy), so a batch
  killed mid-way resumes without redoing or losing a line.
- `manager`: the Files and Batches API's state machine behind the server's endpoints.
- `limits`: its limits (light: the CLI builds its flags from them).
- `run_batch`: `pagedserve run-batch -i IN.jsonl -o OUT.jsonl`.
"""
