"""PostgreSQL access: the connection pool, versioned migrations and the embedded default."""
