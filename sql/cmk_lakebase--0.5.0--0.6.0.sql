-- cmk_lakebase 0.5.0 -> 0.6.0: cipher_stats() (issue 20).
\echo Use "ALTER EXTENSION cmk_lakebase UPDATE TO '0.6.0'" to load this file. \quit

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
