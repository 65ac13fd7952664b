-- cmk_lakebase 0.1.0 install script (frozen: kept so that the 0.1.0 -> 0.2.0 upgrade path can be tested)
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
