--
-- cmk_lifecycle: key lifecycle and governance (issue 5) on an encrypted instance:
-- the 0.2.0 -> 0.3.0 upgrade, named key configurations and their errors, rewrap and
-- KEK rotation online, the audit trail, and separation of duties with real roles.
-- Output must not depend on keys, paths or counts: only booleans and fixed values.
--
CREATE EXTENSION cmk_lakebase VERSION '0.1.0';
ALTER EXTENSION cmk_lakebase UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'cmk_lakebase';

-- The key administrator role: no login, no superuser, nothing on user data.
SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls
FROM pg_roles WHERE rolname = 'cmk_admin';

-- Errors are reported as SQLSTATE and message (details hold temporary paths).
CREATE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'cmk-[0-9a-f]{8}', 'KEY', 'g');
END $$;

-- Data written before any key operation, read back after each.
CREATE TABLE lc_data (id int PRIMARY KEY, v text);
INSERT INTO lc_data SELECT g, 'lifecycle ' || g FROM generate_series(1, 500) g;

-- The cluster starts bound to the configuration "default" (its keyring's).
SELECT name, provider, key_id ~ '^cmk-[0-9a-f]{8}$' AS key_id_ok, bound,
       options ? 'key_store' AS has_key_store, created_at IS NOT NULL AS has_created_at
FROM cmk_lakebase.key_configs();
SELECT options->>'key_store' AS key_store FROM cmk_lakebase.key_configs() WHERE bound \gset

-- A second configuration (no KMS call: a key that does not exist is accepted here
-- and refused when the cluster is bound to it).
SELECT cmk_lakebase.create_key_config('second', 'local', 'regress-missing-key',
                                      jsonb_build_object('key_store', :'key_store'));
SELECT name, provider, key_id, bound FROM cmk_lakebase.key_configs() WHERE NOT bound;

-- Bad input: clear errors, nothing changed.
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('second', 'local', 'x', '{"key_store": "/tmp"}')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('Bad Name', 'local', 'x', '{"key_store": "/tmp"}')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('nostore', 'local', 'x')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('relstore', 'local', 'x', '{"key_store": "keys"}')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('badid', 'local', 'bad/id', '{"key_store": "/tmp"}')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('nosuch', 'nosuch', 'x')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('aws1', 'aws', 'alias/x')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('kmip1', 'kmip', 'uid-1', '{"port": "5696"}')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('gcp1', 'gcp', 'projects/p/keyRings/r')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('vault1', 'vault', 'k', '{"addr": "ftp://vault.example.com"}')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('secret', 'local', 'x', '{"key_store": "/tmp", "api_token": "abc"}')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('num', 'local', 'x', '{"key_store": "/tmp", "n": 1}')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config('arr', 'local', 'x', '[1]')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.create_key_config(NULL, 'local', 'x')$$);
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_cluster('nope')$$);
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_cluster('default')$$);
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_cluster('second')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.drop_key_config('default')$$);
SELECT pg_temp.error_of($$SELECT cmk_lakebase.drop_key_config('nope')$$);

-- Databases bound to key configurations of their own (the rest: test/t/071).
CREATE DATABASE regress_cmk_bound;
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_database('regress_cmk_no_such_db', 'default')$$);
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_database('regress_cmk_bound', 'nope')$$);
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_database('regress_cmk_bound', 'Bad Name')$$);
-- The configuration's key does not exist in its key store: the KMS refuses, nothing changes.
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_database('regress_cmk_bound', 'second')$$);
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.unbind_database('regress_cmk_bound')$$);
-- A key provider that cannot be reached (its key store is not there): binding the
-- cluster or a database fails cleanly, nothing changes, the cluster keeps serving.
SELECT cmk_lakebase.create_key_config('unreachable', 'local', 'regress-key',
                                      '{"key_store": "/nonexistent/cmk_regress_key_store"}');
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_cluster('unreachable')$$);
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_database('regress_cmk_bound', 'unreachable')$$);
SELECT name FROM cmk_lakebase.key_configs() WHERE bound;
SELECT cmk_lakebase.drop_key_config('unreachable');
SELECT count(*) AS bound_databases FROM cmk_lakebase.database_keys();
-- A KEK of its own under the cluster's configuration.
SELECT action, database_name, key_config, provider, kek_fingerprint IS NOT NULL AS has_kek
FROM cmk_lakebase.bind_database('regress_cmk_bound', 'default');
SELECT database_name, state, key_config, provider, kek_fingerprint <> (SELECT kek_fingerprint FROM cmk_lakebase.cmk_status()) AS own_kek,
       bound_at IS NOT NULL AS has_bound_at
FROM cmk_lakebase.database_keys();
SELECT pg_temp.error_of($$SELECT * FROM cmk_lakebase.bind_database('regress_cmk_bound', 'default')$$);
SELECT action, database_name FROM cmk_lakebase.unbind_database('regress_cmk_bound');
SELECT count(*) AS bound_databases FROM cmk_lakebase.database_keys();
SELECT action, outcome, count(*) > 0 AS present FROM cmk_lakebase.audit_log
WHERE action IN ('bind_database', 'unbind_database') GROUP BY action, outcome ORDER BY action, outcome;
DROP DATABASE regress_cmk_bound;
SELECT name, bound FROM cmk_lakebase.key_configs() ORDER BY name;

-- Re-wrap the KEK: same KEK and generation, the keyring rewritten.
SELECT kek_fingerprint AS fp0, kek_generation AS gen0 FROM cmk_lakebase.cmk_status() \gset
SELECT action, key_config, provider, kek_generation = :gen0 AS same_generation,
       kek_fingerprint = :'fp0' AS same_kek, key_version IS NOT NULL AS has_version,
       completed_interrupted_rotation
FROM cmk_lakebase.rewrap();

-- Rotate the KEK: a new KEK (new fingerprint), generation + 1, every DEK kept.
SELECT dek_count AS deks0 FROM cmk_lakebase.cmk_status() \gset
SELECT fork, dek_fingerprint AS dek0 FROM cmk_lakebase.relation_keys('lc_data') WHERE fork = 'main' \gset
SELECT action, kek_generation_before = :gen0 AS from_gen0, kek_generation = :gen0 + 1 AS to_next,
       kek_fingerprint <> :'fp0' AS new_kek
FROM cmk_lakebase.rotate_kek();
SELECT key_state, kek_generation = :gen0 + 1 AS generation_bumped, kek_fingerprint <> :'fp0' AS new_kek,
       dek_count >= :deks0 AS deks_kept
FROM cmk_lakebase.cmk_status();
-- The data files' keys did not change (no re-encryption), the data reads back.
SELECT dek_fingerprint = :'dek0' AS same_dek FROM cmk_lakebase.relation_keys('lc_data') WHERE fork = 'main';
SELECT count(*), sum(id) FROM lc_data;
-- New files after the rotation get keys under the new KEK, and read back.
CREATE TABLE lc_after (id int);
INSERT INTO lc_after SELECT generate_series(1, 100);
SELECT count(*) FROM lc_after;
SELECT cmk_lakebase.relation_is_encrypted('lc_after') AS after_encrypted;
-- The watchdog follows the new generation.
SELECT cmk_lakebase.check_key_now() AS watchdog_after_rotation;

-- The audit trail: every operation above, with the expected fields, no key material.
SELECT action, outcome, count(*) > 0 AS present
FROM cmk_lakebase.audit_log
WHERE action IN ('rewrap', 'rotate_kek', 'create_key_config', 'bind_cluster', 'drop_key_config', 'wrap', 'unwrap', 'status')
GROUP BY action, outcome ORDER BY action, outcome;
SELECT bool_and(event_time IS NOT NULL) AS has_time, bool_and(pid > 0) AS has_pid,
       bool_and(actor IS NOT NULL) AS has_actor, bool_and(provider = 'local') AS has_provider,
       bool_and(key_id IS NOT NULL) AS has_key_id
FROM cmk_lakebase.audit_log WHERE action IN ('rewrap', 'rotate_kek');
SELECT actor = current_user AS actor_is_caller, kek_generation = :gen0 + 1 AS generation
FROM cmk_lakebase.audit_log WHERE action = 'rotate_kek' AND outcome = 'ok'
ORDER BY event_time DESC LIMIT 1;
-- Each provider call carries the provider's request id (the local store makes its own).
SELECT action, bool_and(request_id ~ '^[0-9a-f]{32}$') AS have_request_ids
FROM cmk_lakebase.audit_log WHERE action IN ('wrap', 'unwrap', 'status') AND outcome = 'ok'
GROUP BY action ORDER BY action;
SELECT count(*) AS lines_with_the_kek_fingerprint
FROM cmk_lakebase.audit_log
WHERE detail LIKE '%' || (SELECT kek_fingerprint FROM cmk_lakebase.cmk_status()) || '%';

-- Separation of duties.
CREATE ROLE regress_cmk_keyadmin;
GRANT cmk_admin TO regress_cmk_keyadmin;
CREATE ROLE regress_cmk_user;
CREATE ROLE regress_cmk_granted;
GRANT USAGE ON SCHEMA cmk_lakebase TO regress_cmk_granted;
GRANT EXECUTE ON FUNCTION cmk_lakebase.rotate_kek() TO regress_cmk_granted;
GRANT EXECUTE ON FUNCTION cmk_lakebase.key_configs() TO regress_cmk_granted;

-- The key admin manages keys and reads the audit trail ...
SET ROLE regress_cmk_keyadmin;
SELECT count(*) > 0 AS sees_configs FROM cmk_lakebase.key_configs();
SELECT action, kek_generation = :gen0 + 2 AS rotated FROM cmk_lakebase.rotate_kek();
SELECT cmk_lakebase.create_key_config('third', 'local', 'regress-third', jsonb_build_object('key_store', :'key_store'));
SELECT cmk_lakebase.drop_key_config('third');
SELECT count(*) > 0 AS reads_audit FROM cmk_lakebase.audit_log WHERE actor = 'regress_cmk_keyadmin';
SELECT key_state FROM cmk_lakebase.cmk_status();
SELECT count(*) >= 0 AS sees_database_keys FROM cmk_lakebase.database_keys();
-- ... and reads no user data.
SELECT count(*) FROM lc_data;
SELECT * FROM cmk_lakebase.relation_keys('lc_data');
RESET ROLE;

-- An ordinary user cannot reach key management at all ...
SET ROLE regress_cmk_user;
SELECT * FROM cmk_lakebase.rotate_kek();
SELECT * FROM cmk_lakebase.audit_log;
RESET ROLE;
GRANT USAGE ON SCHEMA cmk_lakebase TO regress_cmk_user;
SET ROLE regress_cmk_user;
SELECT * FROM cmk_lakebase.rotate_kek();
SELECT * FROM cmk_lakebase.rewrap();
SELECT * FROM cmk_lakebase.key_configs();
SELECT * FROM cmk_lakebase.database_keys();
SELECT * FROM cmk_lakebase.bind_database(current_database(), 'default');
SELECT * FROM cmk_lakebase.audit_log;
SELECT cmk_lakebase.create_key_config('x', 'local', 'x', '{}');
SELECT * FROM cmk_lakebase.cmk_status();
RESET ROLE;
-- ... and EXECUTE granted by mistake is not enough: the functions check the role.
SET ROLE regress_cmk_granted;
SELECT * FROM cmk_lakebase.rotate_kek();
SELECT * FROM cmk_lakebase.key_configs();
RESET ROLE;
SELECT actor, action, outcome FROM cmk_lakebase.audit_log WHERE outcome = 'denied' ORDER BY event_time;

-- Clean up.
SELECT cmk_lakebase.drop_key_config('second');
SELECT name, bound FROM cmk_lakebase.key_configs();
DROP TABLE lc_data, lc_after;
REVOKE ALL ON SCHEMA cmk_lakebase FROM regress_cmk_user, regress_cmk_granted;
REVOKE ALL ON FUNCTION cmk_lakebase.rotate_kek() FROM regress_cmk_granted;
REVOKE ALL ON FUNCTION cmk_lakebase.key_configs() FROM regress_cmk_granted;
DROP ROLE regress_cmk_keyadmin, regress_cmk_user, regress_cmk_granted;
DROP EXTENSION cmk_lakebase;
