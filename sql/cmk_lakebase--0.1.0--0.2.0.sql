-- cmk_lakebase 0.1.0 -> 0.2.0: the revocation watchdog
\echo Use "ALTER EXTENSION cmk_lakebase UPDATE TO '0.2.0'" to load this file. \quit

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
