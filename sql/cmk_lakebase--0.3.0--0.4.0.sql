-- cmk_lakebase 0.3.0 -> 0.4.0: databases bound to key configurations of their own.
\echo Use "ALTER EXTENSION cmk_lakebase UPDATE TO '0.4.0'" to load this file. \quit

-- 0.3.0's bind_database() returned void and raised feature-not-supported.
DROP FUNCTION bind_database(name, text);

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

REVOKE ALL ON FUNCTION bind_database(name, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION unbind_database(name) FROM PUBLIC;
REVOKE ALL ON FUNCTION database_keys() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bind_database(name, text) TO cmk_admin;
GRANT EXECUTE ON FUNCTION unbind_database(name) TO cmk_admin;
GRANT EXECUTE ON FUNCTION database_keys() TO cmk_admin;
