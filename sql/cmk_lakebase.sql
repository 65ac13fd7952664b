-- cmk_lakebase install script (source of cmk_lakebase--<version>.sql)
\echo Use "CREATE EXTENSION cmk_lakebase" to load this file. \quit

-- The cluster's key configuration and key state, as the running server sees it.
CREATE FUNCTION cmk_status(
    OUT provider text,
    OUT key_id text,
    OUT key_state text,
    OUT kek_fingerprint text,
    OUT kek_generation integer,
    OUT per_boot_key_present boolean,
    OUT dek_count bigint,
    OUT cluster_id text,
    OUT layer_mode text,
    OUT data_directory text)
RETURNS record
AS 'MODULE_PATHNAME', 'cmk_status'
LANGUAGE C STRICT VOLATILE;

-- One row per existing segment file of every fork of a relation: where it is, its
-- file class, whether it is encrypted, and the fingerprint of its key.
CREATE FUNCTION relation_keys(
    rel regclass,
    OUT fork text,
    OUT segno integer,
    OUT path text,
    OUT file_class text,
    OUT encrypted boolean,
    OUT key_kind text,
    OUT dek_fingerprint text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cmk_relation_keys'
LANGUAGE C STRICT VOLATILE;

-- True when every existing segment of every fork of the relation is encrypted.
CREATE FUNCTION relation_is_encrypted(rel regclass)
RETURNS boolean
AS 'MODULE_PATHNAME', 'cmk_relation_is_encrypted'
LANGUAGE C STRICT VOLATILE;

REVOKE ALL ON FUNCTION cmk_status() FROM PUBLIC;
REVOKE ALL ON FUNCTION relation_keys(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION relation_is_encrypted(regclass) FROM PUBLIC;

-- The revocation watchdog's view of the key (shared memory of the watchdog worker).
CREATE FUNCTION watchdog_status(
    OUT state text,
    OUT provider text,
    OUT key_id text,
    OUT last_check timestamptz,
    OUT last_result text,
    OUT consecutive_failures integer,
    OUT last_ok timestamptz,
    OUT since_last_ok interval,
    OUT next_check timestamptz,
    OUT action text,
    OUT worker_pid integer,
    OUT checks bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'cmk_watchdog_status'
LANGUAGE C STRICT VOLATILE;

-- Makes the watchdog check the key now; returns the resulting state.
CREATE FUNCTION check_key_now()
RETURNS text
AS 'MODULE_PATHNAME', 'cmk_check_key_now'
LANGUAGE C STRICT VOLATILE;

REVOKE ALL ON FUNCTION watchdog_status() FROM PUBLIC;
REVOKE ALL ON FUNCTION check_key_now() FROM PUBLIC;
