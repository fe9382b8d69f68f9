-- An IMAP UID names a message only together with its folder's UIDVALIDITY: after the server
-- renumbers a folder, an old UID may name another message.  ingested_message keeps the UIDVALIDITY
-- its uid belongs to, so QRESYNC's VANISHED UIDs and "delete after processing" only ever act on the
-- current numbering, and an index finds a folder's UIDs without reading the whole mailbox.

ALTER TABLE ingested_message ADD COLUMN uidvalidity bigint;

-- Rows written before: the best knowledge is the folder's current UIDVALIDITY.
UPDATE ingested_message im SET uidvalidity = s.uidvalidity
FROM imap_folder_state s
WHERE s.mailbox_id = im.mailbox_id AND s.folder = im.folder AND im.uid IS NOT NULL;

CREATE INDEX ingested_message_imap_uid ON ingested_message (mailbox_id, folder, uid) WHERE uid IS NOT NULL;
