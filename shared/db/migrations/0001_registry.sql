-- The registry: organizations, email server profiles, users, queues, mailboxes and their alerts,
-- the CRM-side records correlation needs, email activities and the decisions behind them.
-- Names follow the reference (EmailServerProfile, Mailbox, SystemUser, Queue, Email activity).

CREATE TABLE organization (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    -- Correlation in the reference's documented order; smart matching off by default.
    correlation_order text[] NOT NULL DEFAULT ARRAY['in_reply_to','tracking_token','thread_index','smart_matching'],
    tracking_token_enabled boolean NOT NULL DEFAULT true,
    tracking_token_prefix  text NOT NULL DEFAULT 'CRM:',
    tracking_token_digits  int NOT NULL DEFAULT 7 CHECK (tracking_token_digits BETWEEN 4 AND 12),
    smart_matching  boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE email_server_profile (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    server_type     text NOT NULL CHECK (server_type IN ('imap','pop3','exchange_server','exchange_online','smtp')),
    incoming_host   text,
    incoming_port   int CHECK (incoming_port BETWEEN 1 AND 65535),
    incoming_tls    text NOT NULL DEFAULT 'implicit' CHECK (incoming_tls IN ('implicit','starttls','none')),
    outgoing_host   text,
    outgoing_port   int CHECK (outgoing_port BETWEEN 1 AND 65535),
    outgoing_tls    text NOT NULL DEFAULT 'starttls' CHECK (outgoing_tls IN ('implicit','starttls','none')),
    use_same_settings_for_outgoing boolean NOT NULL DEFAULT true,
    -- Exchange endpoints: EWS URL for Exchange Server, Graph base URL for Exchange Online.
    service_url     text,
    auth_method     text NOT NULL DEFAULT 'mailbox_credentials'
                    CHECK (auth_method IN ('mailbox_credentials','profile_impersonation','oauth2')),
    profile_username text,
    profile_secret  bytea,                      -- Fernet-encrypted
    oauth_token_url text,
    oauth_client_id text,
    oauth_client_secret bytea,                  -- Fernet-encrypted
    oauth_scope     text,
    tls_ca_file     text,                       -- extra trust anchor; verification itself is never off
    is_default      boolean NOT NULL DEFAULT false,
    max_concurrent_connections int NOT NULL DEFAULT 10 CHECK (max_concurrent_connections BETWEEN 1 AND 1000),
    min_polling_interval_seconds int NOT NULL DEFAULT 60 CHECK (min_polling_interval_seconds BETWEEN 1 AND 86400),
    process_email_received_after timestamptz,
    move_failed_to_undeliverable boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, name)
);
-- Exactly one default profile per organization (at most one by constraint; the service layer
-- makes the first profile the default so there is one as soon as there is any).
CREATE UNIQUE INDEX email_server_profile_one_default ON email_server_profile (organization_id) WHERE is_default;

CREATE TABLE crm_user (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    full_name       text NOT NULL,
    email           text NOT NULL,
    incoming_method text NOT NULL DEFAULT 'server_side_sync' CHECK (incoming_method IN ('none','server_side_sync','forward_mailbox')),
    outgoing_method text NOT NULL DEFAULT 'server_side_sync' CHECK (outgoing_method IN ('none','server_side_sync')),
    act_method      text NOT NULL DEFAULT 'none' CHECK (act_method IN ('none','server_side_sync')),
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX crm_user_email ON crm_user (organization_id, lower(email));

CREATE TABLE queue (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    name            text NOT NULL,
    email           text NOT NULL,
    incoming_method text NOT NULL DEFAULT 'server_side_sync' CHECK (incoming_method IN ('none','server_side_sync','forward_mailbox')),
    outgoing_method text NOT NULL DEFAULT 'server_side_sync' CHECK (outgoing_method IN ('none','server_side_sync')),
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX queue_email ON queue (organization_id, lower(email));
CREATE UNIQUE INDEX queue_name ON queue (organization_id, name);

CREATE TABLE mailbox (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    -- A user has at most one mailbox, a queue at most one; a forward mailbox belongs to neither.
    owner_user_id   uuid UNIQUE REFERENCES crm_user(id) ON DELETE CASCADE,
    owner_queue_id  uuid UNIQUE REFERENCES queue(id) ON DELETE CASCADE,
    name            text NOT NULL,
    email           text NOT NULL,
    profile_id      uuid REFERENCES email_server_profile(id) ON DELETE SET NULL,
    username        text,
    secret          bytea,                      -- Fernet-encrypted password or token
    active          boolean NOT NULL DEFAULT true,
    email_approved  boolean NOT NULL DEFAULT false,
    -- Test & Enable, per direction: not_run, success, failure.
    incoming_status text NOT NULL DEFAULT 'not_run' CHECK (incoming_status IN ('not_run','success','failure')),
    incoming_tested_at timestamptz,
    incoming_test_message text,
    outgoing_status text NOT NULL DEFAULT 'not_run' CHECK (outgoing_status IN ('not_run','success','failure')),
    outgoing_tested_at timestamptz,
    outgoing_test_message text,
    act_status      text NOT NULL DEFAULT 'not_run' CHECK (act_status IN ('not_run','success','failure')),
    act_tested_at   timestamptz,
    act_test_message text,
    incoming_error_count int NOT NULL DEFAULT 0,
    outgoing_error_count int NOT NULL DEFAULT 0,
    act_error_count int NOT NULL DEFAULT 0,
    incoming_backoff_until timestamptz,
    outgoing_backoff_until timestamptz,
    act_backoff_until timestamptz,
    tracking        text NOT NULL DEFAULT 'all'
                    CHECK (tracking IN ('all','responses','known_records','email_enabled_records')),
    convert_to_activities boolean NOT NULL DEFAULT true,      -- queues: convert incoming email
    delete_after_processing boolean NOT NULL DEFAULT false,   -- queues: delete from the server
    tracked_folders text[] NOT NULL DEFAULT ARRAY['INBOX'],
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (owner_user_id IS NULL OR owner_queue_id IS NULL)
);
CREATE UNIQUE INDEX mailbox_email ON mailbox (organization_id, lower(email));

CREATE TABLE mailbox_alert (
    id              bigserial PRIMARY KEY,
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,
    severity        text NOT NULL CHECK (severity IN ('information','warning','error')),
    direction       text CHECK (direction IN ('incoming','outgoing','act')),
    code            text NOT NULL,
    message         text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mailbox_alert_by_mailbox ON mailbox_alert (mailbox_id, created_at DESC);

-- CRM-side records that party resolution and the "known records" tracking options need.
CREATE TABLE crm_record (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    kind            text NOT NULL CHECK (kind IN ('contact','account','lead')),
    name            text NOT NULL,
    email           text NOT NULL,
    email_enabled   boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX crm_record_email ON crm_record (organization_id, lower(email));

-- Raw MIME, content-addressed, stored before any event refers to it.
CREATE TABLE raw_message (
    sha256          text PRIMARY KEY,
    size            int NOT NULL,
    data            bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE tracking_token_seq;

CREATE TABLE email_activity (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    message_id      text NOT NULL,
    direction       text NOT NULL CHECK (direction IN ('incoming','outgoing')),
    status          text NOT NULL CHECK (status IN ('received','pending_send','sending','sent','failed','canceled')),
    subject         text NOT NULL DEFAULT '',
    normalized_subject text NOT NULL DEFAULT '',
    from_address    text,
    to_addresses    text[] NOT NULL DEFAULT '{}',
    cc_addresses    text[] NOT NULL DEFAULT '{}',
    parties         jsonb NOT NULL DEFAULT '[]',
    regarding_kind  text,
    regarding_id    uuid,
    tracking_token  text,
    thread_root     text,
    correlated_by   text,
    raw_sha256      text REFERENCES raw_message(sha256),
    preview         text NOT NULL DEFAULT '',
    sent_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- One email activity per Message-ID per organization.
    UNIQUE (organization_id, message_id)
);
CREATE INDEX email_activity_token ON email_activity (organization_id, tracking_token) WHERE tracking_token IS NOT NULL;
CREATE INDEX email_activity_thread ON email_activity (organization_id, thread_root) WHERE thread_root IS NOT NULL;
CREATE INDEX email_activity_subject ON email_activity (organization_id, normalized_subject);

-- The mailboxes an activity was tracked through (one activity, several tracked mailboxes).
CREATE TABLE email_activity_mailbox (
    activity_id     uuid NOT NULL REFERENCES email_activity(id) ON DELETE CASCADE,
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,
    PRIMARY KEY (activity_id, mailbox_id)
);

-- Every decision, tracked or not, with the rule that made it: `conduit message why` reads this.
CREATE TABLE email_decision (
    organization_id uuid NOT NULL REFERENCES organization(id) ON DELETE CASCADE,
    mailbox_id      uuid NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE,
    message_id      text NOT NULL,
    tracked         boolean NOT NULL,
    rule            text NOT NULL,
    reason          text NOT NULL,
    explanation     text NOT NULL,
    activity_id     uuid REFERENCES email_activity(id) ON DELETE SET NULL,
    subject         text NOT NULL DEFAULT '',
    from_address    text,
    decided_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox_id, message_id)
);
CREATE INDEX email_decision_by_message ON email_decision (organization_id, message_id);

-- Transactional outbox: every registry change and every produced event is written here in the
-- same transaction as the change, and a relay in each service publishes it (at least once).
CREATE TABLE event_outbox (
    id              bigserial PRIMARY KEY,
    topic           text NOT NULL,
    key             text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
