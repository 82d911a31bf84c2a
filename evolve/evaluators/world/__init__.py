"""The embedded skill world: three generated skills mirroring the paper's coding, OS and database tasks, each
graded by execution (code in the sandbox, shell commands in a simulated file system, SQL in read-only SQLite)."""
