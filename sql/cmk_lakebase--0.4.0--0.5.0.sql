-- cmk_lakebase 0.4.0 -> 0.5.0: watchdog_status() shows the probe in flight (issue 18).
\echo Use "ALTER EXTENSION cmk_lakebase UPDATE TO '0.5.0'" to load this file. \quit

-- Two more columns: whether a probe of the key provider is running and since when (a
-- probe past cmk_lakebase.probe_timeout makes the state "unavailable"). A function's
-- result type cannot be altered: dropped and created again, with the same grants
-- (grants made outside the extension must be made again).
DROP FUNCTION watchdog_status();
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

REVOKE ALL ON FUNCTION watchdog_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION watchdog_status() TO cmk_admin;
