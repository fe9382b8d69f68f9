-- Raw MIME without compression, inside the row up to a page (toast_tuple_target 8160 bytes: a
-- message up to ~8 KB is one heap tuple; a larger one goes to TOAST, still uncompressed).
-- pglz compression was most of the cost of storing a message (a store micro-benchmark of 10,000
-- realistic 7 KB messages: 1.24-1.41 s compressed, 0.23-0.37 s without; docs/benchmarks.md,
-- "Ingest"), and raw mail compresses poorly anyway (base64 attachments, already compressed
-- parts).  Rows stored before this migration keep their form; both read back the same.
ALTER TABLE raw_message ALTER COLUMN data SET STORAGE EXTERNAL;
ALTER TABLE raw_message SET (toast_tuple_target = 8160);
