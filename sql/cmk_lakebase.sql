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
    OUT checks bigint,
    OUT probe_in_flight boolean,
    OUT probe_started timestamptz)
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

-- The key administrator (separation of duties): manages key configurations, bindings
-- and rotation, reads the audit trail, and has no privilege on any user data. Roles
-- are cluster-wide: DROP EXTENSION leaves it in place.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'cmk_admin') THEN
    CREATE ROLE cmk_admin NOLOGIN;
  END IF;
END
$$;
GRANT USAGE ON SCHEMA @extschema@ TO cmk_admin;

-- Re-wraps the KEK under the CMK's current version (after a rotation of the CMK in
-- the key provider). Only keyring.json changes.
CREATE FUNCTION rewrap(
    OUT action text,
    OUT key_config text,
    OUT provider text,
    OUT key_id text,
    OUT key_version_before text,
    OUT key_version text,
    OUT kek_generation_before integer,
    OUT kek_generation integer,
    OUT kek_fingerprint text,
    OUT completed_interrupted_rotation boolean)
RETURNS record
AS 'MODULE_PATHNAME', 'cmk_rewrap'
LANGUAGE C STRICT VOLATILE;

-- New KEK, every DEK in the key map re-sealed under it, the old KEK destroyed
-- (kek_generation + 1). No data file is rewritten.
CREATE FUNCTION rotate_kek(
    OUT action text,
    OUT key_config text,
    OUT provider text,
    OUT key_id text,
    OUT key_version_before text,
    OUT key_version text,
    OUT kek_generation_before integer,
    OUT kek_generation integer,
    OUT kek_fingerprint text,
    OUT completed_interrupted_rotation boolean)
RETURNS record
AS 'MODULE_PATHNAME', 'cmk_rotate_kek'
LANGUAGE C STRICT VOLATILE;

-- Binds the cluster to another named key configuration (another CMK or provider):
-- the KEK is wrapped by the new one, proven to unwrap, then the keyring switches.
CREATE FUNCTION bind_cluster(
    config_name text,
    OUT action text,
    OUT key_config text,
    OUT provider text,
    OUT key_id text,
    OUT key_version_before text,
    OUT key_version text,
    OUT kek_generation_before integer,
    OUT kek_generation integer,
    OUT kek_fingerprint text,
    OUT completed_interrupted_rotation boolean)
RETURNS record
AS 'MODULE_PATHNAME', 'cmk_bind_cluster'
LANGUAGE C STRICT VOLATILE;

-- A database bound to a key configuration of its own: its relation files' DEKs are
-- wrapped under a KEK of its own, wrapped by that configuration's CMK. Online, no data
-- file rewritten. For a database already bound: re-wraps its KEK under the new
-- configuration (action rebind_database).
CREATE FUNCTION bind_database(
    database name,
    config_name text,
    OUT action text,
    OUT database_name name,
    OUT key_config text,
    OUT provider text,
    OUT key_id text,
    OUT key_version text,
    OUT kek_fingerprint text,
    OUT dek_count bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'cmk_bind_database'
LANGUAGE C STRICT VOLATILE;

-- Back to the cluster's key configuration: the DEKs re-wrapped under the cluster KEK,
-- the database's own KEK destroyed.
CREATE FUNCTION unbind_database(
    database name,
    OUT action text,
    OUT database_name name,
    OUT key_config text,
    OUT provider text,
    OUT key_id text,
    OUT key_version text,
    OUT kek_fingerprint text,
    OUT dek_count bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'cmk_unbind_database'
LANGUAGE C STRICT VOLATILE;

-- Databases bound to key configurations of their own, and the state of their keys:
-- open, closing (revocation under way) or locked (key revoked or unavailable).
CREATE FUNCTION database_keys(
    OUT database_name name,
    OUT database_oid oid,
    OUT state text,
    OUT key_config text,
    OUT provider text,
    OUT key_id text,
    OUT key_version text,
    OUT kek_fingerprint text,
    OUT dek_count bigint,
    OUT bound_at timestamptz,
    OUT rotated_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cmk_database_keys'
LANGUAGE C STRICT VOLATILE;

-- Named key configurations (provider, key id, options: credentials references only),
-- kept in cmk_lakebase/configs.json in the data directory.
CREATE FUNCTION create_key_config(name text, provider text, key_id text, options jsonb DEFAULT '{}')
RETURNS void
AS 'MODULE_PATHNAME', 'cmk_create_key_config'
LANGUAGE C VOLATILE;

CREATE FUNCTION drop_key_config(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'cmk_drop_key_config'
LANGUAGE C STRICT VOLATILE;

CREATE FUNCTION key_configs(
    OUT name text,
    OUT provider text,
    OUT key_id text,
    OUT options jsonb,
    OUT bound boolean,
    OUT created_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cmk_key_configs'
LANGUAGE C STRICT VOLATILE;

-- The local audit trail of key events (cmk_lakebase/audit.log.1 and audit.log).
CREATE FUNCTION audit_log_read(
    OUT event_time timestamptz,
    OUT pid integer,
    OUT actor text,
    OUT action text,
    OUT key_config text,
    OUT provider text,
    OUT key_id text,
    OUT key_version text,
    OUT kek_generation integer,
    OUT request_id text,
    OUT outcome text,
    OUT detail text,
    OUT count bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'cmk_audit_log'
LANGUAGE C STRICT VOLATILE;

CREATE VIEW audit_log AS SELECT * FROM @extschema@.audit_log_read();

REVOKE ALL ON FUNCTION rewrap() FROM PUBLIC;
REVOKE ALL ON FUNCTION rotate_kek() FROM PUBLIC;
REVOKE ALL ON FUNCTION bind_cluster(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bind_database(name, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION unbind_database(name) FROM PUBLIC;
REVOKE ALL ON FUNCTION database_keys() FROM PUBLIC;
REVOKE ALL ON FUNCTION create_key_config(text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION drop_key_config(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION key_configs() FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_log_read() FROM PUBLIC;
REVOKE ALL ON audit_log FROM PUBLIC;

GRANT EXECUTE ON FUNCTION rewrap() TO cmk_admin;
GRANT EXECUTE ON FUNCTION rotate_kek() TO cmk_admin;
GRANT EXECUTE ON FUNCTION bind_cluster(text) TO cmk_admin;
GRANT EXECUTE ON FUNCTION bind_database(name, text) TO cmk_admin;
GRANT EXECUTE ON FUNCTION unbind_database(name) TO cmk_admin;
GRANT EXECUTE ON FUNCTION database_keys() TO cmk_admin;
GRANT EXECUTE ON FUNCTION create_key_config(text, text, text, jsonb) TO cmk_admin;
GRANT EXECUTE ON FUNCTION drop_key_config(text) TO cmk_admin;
GRANT EXECUTE ON FUNCTION key_configs() TO cmk_admin;
GRANT EXECUTE ON FUNCTION audit_log_read() TO cmk_admin;
GRANT SELECT ON audit_log TO cmk_admin;
-- Status is part of the key administrator's job (still not granted to PUBLIC).
GRANT EXECUTE ON FUNCTION cmk_status() TO cmk_admin;
GRANT EXECUTE ON FUNCTION watchdog_status() TO cmk_admin;
GRANT EXECUTE ON FUNCTION check_key_now() TO cmk_admin;

-- Bytes the server's processes have enciphered and deciphered since it started: what
-- the encryption costs in work (issue 20). Counts lag by up to 256 KiB per process.
CREATE FUNCTION cipher_stats(
    OUT bytes_encrypted bigint,
    OUT bytes_decrypted bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'cmk_cipher_stats'
LANGUAGE C STRICT VOLATILE;

REVOKE ALL ON FUNCTION cipher_stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cipher_stats() TO cmk_admin;
GRANT EXECUTE ON FUNCTION cipher_stats() TO pg_monitor;
