--
-- cmk_status: the SQL surface of cmk_lakebase, on an encrypted instance
-- (test/run_regress.sh creates it with "pg_cmk initdb" and the local provider).
-- Output must not depend on keys, OIDs or counts: only booleans and fixed values.
--
CREATE EXTENSION cmk_lakebase;

-- Key configuration and state of the running cluster.
SELECT provider,
       key_state,
       key_id ~ '^cmk-[0-9a-f]{8}$' AS key_id_ok,
       kek_fingerprint ~ '^[0-9a-f]{32}$' AS kek_fingerprint_ok,
       kek_generation >= 1 AS kek_generation_ok,
       per_boot_key_present,
       dek_count > 0 AS has_deks,
       length(cluster_id) > 0 AS has_cluster_id,
       layer_mode,
       data_directory = current_setting('data_directory') AS data_directory_ok
FROM cmk_lakebase.cmk_status();

-- The fingerprint reveals nothing and is stable within a boot.
SELECT (SELECT kek_fingerprint FROM cmk_lakebase.cmk_status()) =
       (SELECT kek_fingerprint FROM cmk_lakebase.cmk_status()) AS fingerprint_stable;

SELECT dek_count AS deks_before FROM cmk_lakebase.cmk_status() \gset

-- A table with an index: every fork of every relation encrypted, each segment with
-- its own DEK.
CREATE TABLE cmk_t (id int PRIMARY KEY, v text);
INSERT INTO cmk_t SELECT g, repeat('cmk_status', 10) || g FROM generate_series(1, 1000) g;
CREATE INDEX cmk_t_v ON cmk_t (v);
VACUUM cmk_t;  -- creates the fsm and vm forks
-- A file gets its DEK with its first write of data; pages still in shared buffers
-- have left only zero pages in it so far. The checkpoint writes them.
CHECKPOINT;

SELECT cmk_lakebase.relation_is_encrypted('cmk_t') AS heap,
       cmk_lakebase.relation_is_encrypted('cmk_t_pkey') AS pkey,
       cmk_lakebase.relation_is_encrypted('cmk_t_v') AS index;

SELECT fork, segno, file_class, encrypted, key_kind,
       dek_fingerprint ~ '^[0-9a-f]{32}$' AS dek_fingerprint_ok,
       right(path, length(pg_relation_filepath('cmk_t')) +
                   CASE fork WHEN 'main' THEN 0 ELSE length(fork) + 1 END) =
         pg_relation_filepath('cmk_t') ||
         CASE fork WHEN 'main' THEN '' ELSE '_' || fork END AS path_ok
FROM cmk_lakebase.relation_keys('cmk_t')
ORDER BY fork, segno;

SELECT fork, segno, file_class, encrypted, key_kind,
       dek_fingerprint ~ '^[0-9a-f]{32}$' AS dek_fingerprint_ok
FROM cmk_lakebase.relation_keys('cmk_t_pkey')
ORDER BY fork, segno;

-- No two segments share a DEK.
SELECT count(*) AS segments,
       count(DISTINCT dek_fingerprint) = count(*) AS all_fingerprints_distinct
FROM (SELECT dek_fingerprint FROM cmk_lakebase.relation_keys('cmk_t')
      UNION ALL
      SELECT dek_fingerprint FROM cmk_lakebase.relation_keys('cmk_t_pkey')
      UNION ALL
      SELECT dek_fingerprint FROM cmk_lakebase.relation_keys('cmk_t_v')) s;

-- New files got new DEKs.
SELECT dek_count > :deks_before AS dek_count_grew FROM cmk_lakebase.cmk_status();

-- Rewriting a relation (new files) gives it new keys.
CREATE TEMP TABLE fp_before AS
  SELECT fork, dek_fingerprint FROM cmk_lakebase.relation_keys('cmk_t');
VACUUM FULL cmk_t;
SELECT count(*) AS rewritten_forks_reusing_a_key
FROM cmk_lakebase.relation_keys('cmk_t') k JOIN fp_before b USING (dek_fingerprint);
SELECT cmk_lakebase.relation_is_encrypted('cmk_t') AS heap_after_vacuum_full;
DROP TABLE fp_before;

-- Catalogs are encrypted too, local and shared.
SELECT cmk_lakebase.relation_is_encrypted('pg_class') AS pg_class,
       cmk_lakebase.relation_is_encrypted('pg_database') AS pg_database;
SELECT DISTINCT file_class, encrypted, key_kind
FROM cmk_lakebase.relation_keys('pg_class');

-- An unlogged table and its index: main and init forks, durable keys. The heap's
-- init fork is an empty file and its main fork holds the zero page PostgreSQL extended
-- it with (an unlogged table's pages reach the file at a shutdown or an eviction, not
-- at a checkpoint): neither has a key yet, a key comes with a file's first write of
-- data. The index's init fork holds a metapage and has its key.
CREATE UNLOGGED TABLE cmk_unlogged (id int PRIMARY KEY);
INSERT INTO cmk_unlogged VALUES (1);
SELECT fork, encrypted, key_kind, dek_fingerprint ~ '^[0-9a-f]{32}$' AS dek_fingerprint_ok,
       (pg_stat_file(path, true)).size AS size
FROM cmk_lakebase.relation_keys('cmk_unlogged')
ORDER BY fork;
SELECT fork, encrypted, key_kind, dek_fingerprint ~ '^[0-9a-f]{32}$' AS dek_fingerprint_ok
FROM cmk_lakebase.relation_keys('cmk_unlogged_pkey')
ORDER BY fork;

-- A temporary table: ephemeral, keyed from the per-boot key.
CREATE TEMP TABLE cmk_tmp AS SELECT g FROM generate_series(1, 1000) g;
SELECT cmk_lakebase.relation_is_encrypted('cmk_tmp') AS temp_encrypted;
SELECT DISTINCT fork, encrypted, key_kind, dek_fingerprint ~ '^[0-9a-f]{32}$' AS fingerprint_shown
FROM cmk_lakebase.relation_keys('cmk_tmp')
ORDER BY fork;

-- Relations without storage.
CREATE VIEW cmk_v AS SELECT 1 AS x;
SELECT count(*) AS view_segments FROM cmk_lakebase.relation_keys('cmk_v');

-- Bad input: clean errors, no crash.
SELECT * FROM cmk_lakebase.relation_keys(0);
SELECT cmk_lakebase.relation_is_encrypted(0);
SELECT * FROM cmk_lakebase.relation_keys('cmk_no_such_table');
SELECT count(*) AS null_input_rows FROM cmk_lakebase.relation_keys(NULL);
SELECT cmk_lakebase.relation_is_encrypted(NULL) IS NULL AS null_input_is_null;
-- A dropped relation (the OID is normalised out of the message).
CREATE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '[0-9]+', 'N', 'g');
END $$;
CREATE TABLE cmk_gone (id int);
SELECT 'cmk_gone'::regclass::oid AS gone_oid \gset
DROP TABLE cmk_gone;
SELECT pg_temp.error_of(format('SELECT * FROM cmk_lakebase.relation_keys(%s)', :gone_oid));
SELECT pg_temp.error_of(format('SELECT cmk_lakebase.relation_is_encrypted(%s)', :gone_oid));

-- Privileges: nothing is granted to PUBLIC.
CREATE ROLE regress_cmk_nobody;
CREATE ROLE regress_cmk_schema_only;
CREATE ROLE regress_cmk_reader;
GRANT USAGE ON SCHEMA cmk_lakebase TO regress_cmk_schema_only, regress_cmk_reader;
GRANT EXECUTE ON FUNCTION cmk_lakebase.cmk_status() TO regress_cmk_reader;
GRANT EXECUTE ON FUNCTION cmk_lakebase.relation_is_encrypted(regclass) TO regress_cmk_reader;
GRANT SELECT ON cmk_t TO regress_cmk_reader;

SET ROLE regress_cmk_nobody;
SELECT provider FROM cmk_lakebase.cmk_status();
RESET ROLE;

SET ROLE regress_cmk_schema_only;
SELECT provider FROM cmk_lakebase.cmk_status();
SELECT * FROM cmk_lakebase.relation_keys('cmk_t');
SELECT cmk_lakebase.relation_is_encrypted('cmk_t');
RESET ROLE;

SET ROLE regress_cmk_reader;
SELECT provider, key_state FROM cmk_lakebase.cmk_status();
SELECT cmk_lakebase.relation_is_encrypted('cmk_t');
SELECT count(*) FROM cmk_lakebase.relation_keys('cmk_t');  -- not granted
RESET ROLE;

-- cipher_stats(): the page cipher's work since the server started. Writing a table
-- out adds at least its pages that hold rows to what was enciphered, reading its file
-- back through the layer as much to what was deciphered (16+ extend a relation by
-- several pages at once: the unused ones stay zeros on disk, which no cipher touches);
-- only monitors and the key administrator may look.
SELECT bytes_encrypted AS enc0 FROM cmk_lakebase.cipher_stats() \gset
CREATE TABLE cmk_cs AS SELECT g, repeat('cipher_stats', 10) AS v FROM generate_series(1, 20000) g;
CHECKPOINT;
SELECT count(DISTINCT (ctid::text::point)[0]) * 8192 AS cs_size FROM cmk_cs \gset
SELECT bytes_encrypted - :enc0 >= :cs_size AS enciphered_the_table FROM cmk_lakebase.cipher_stats();
SELECT bytes_decrypted AS dec0 FROM cmk_lakebase.cipher_stats() \gset
SELECT length(pg_read_binary_file(pg_relation_filepath('cmk_cs'))) = pg_relation_size('cmk_cs') AS read_whole_file;
SELECT bytes_decrypted - :dec0 >= :cs_size AS deciphered_the_file FROM cmk_lakebase.cipher_stats();
SELECT has_function_privilege('public', 'cmk_lakebase.cipher_stats()', 'EXECUTE') AS public,
       has_function_privilege('pg_monitor', 'cmk_lakebase.cipher_stats()', 'EXECUTE') AS pg_monitor,
       has_function_privilege('cmk_admin', 'cmk_lakebase.cipher_stats()', 'EXECUTE') AS cmk_admin;
DROP TABLE cmk_cs;

-- Clean up.
DROP VIEW cmk_v;
DROP TABLE cmk_t, cmk_unlogged, cmk_tmp;
REVOKE ALL ON SCHEMA cmk_lakebase FROM regress_cmk_schema_only, regress_cmk_reader;
REVOKE ALL ON FUNCTION cmk_lakebase.cmk_status() FROM regress_cmk_reader;
REVOKE ALL ON FUNCTION cmk_lakebase.relation_is_encrypted(regclass) FROM regress_cmk_reader;
DROP ROLE regress_cmk_nobody, regress_cmk_schema_only, regress_cmk_reader;
DROP EXTENSION cmk_lakebase;
