"""Wrong changes on purpose: each must turn a test red. ``python -m tests.mutants [M1 ...]``.

A protocol's guarantees are only as good as the tests that would notice them broken. Each
entry below is one deliberate mistake (in the load protocol: drop the fence, release
without the owner, block the reader, compare two clocks; and in nginx's tier, the metrics
directory, the CLI, ...), the code it changes, and the tests that must catch it. The
script applies one at a time, runs those tests, and always restores the file; it exits
non-zero if a mistake went unnoticed. Not part of ``make test`` (it reruns parts of the
suite once per mistake); run it after changing what one guards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
 ("M1 failure recorded after the claim is released (here: never)", "service/readpath/loader.py",
  "                self.give_back(claim, error_record(exc) if exc.status in (502, 504)\n"
  "                               else None, self.settings.error_ttl)",
  "                self.give_back(claim)",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_swr.py"]),
 ("M2 owner check then a plain delete", "service/readpath/lease.py",
  "            code = self.leases.mdelete(claim.key, claim.lease_cas)",
  "            code = self.leases.mdelete(claim.key)",
  ["tests/integration/test_lease.py"]),
 ("M3 backend write without a fence", "service/flask/coalesce.py",
  "self.memcached_ttl(timeout), cas=held.claim.fence)",
  "self.memcached_ttl(timeout), cas=None)",
  ["tests/integration/test_dropin.py"]),
 ("M4 schedule blocks a stale reader when the pool is full", "service/readpath/refresher.py",
  "        if self._pool.full():\n",
  "        if False:\n",
  ["tests/unit/readpath/test_pipeline.py"]),
 ("M5 waiters never woken when the loading request raises", "service/readpath/loader.py",
  "            flight.result.set_exception(_Pass())\n"
  "            raise\n"
  "        except BaseException:",
  "            raise\n        except BaseException:",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_uncacheable.py"]),
 ("M6 claim check skipped on the meta path", "service/readpath/tiers.py",
  "            if got.won:\n",
  "            if True:\n",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py"]),
 ("M7 an EX/NF write turned into a plain set", "service/readpath/tiers.py",
  "        if stored.ok:\n            claim.fence = stored.cas",
  "        if not stored.ok:\n"
  "            self.store.set(key, entry.to_wire(), "
  "entry.ttl(entry.stored_at))\n"
  "            stored = Stored('HD')\n"
  "        if stored.ok:\n"
  "            claim.fence = stored.cas",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py"]),
 ("M8 comparing two clocks (the writer's stamp trusted)", "service/readpath/tiers.py",
  "        lifetime = entry.windows.lifetime\n        if ttl is None",
  "        lifetime = entry.windows.lifetime\n        return entry\n        if ttl is None",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py",
   "tests/integration/test_netns_fleet.py::test_one_hosts_clock_30s_off"]),
 ("M9 the lease always granted", "service/readpath/lease.py",
  "        if not stored.ok:\n"
  "            metrics.lease_total.labels(\"contended\").inc()\n"
  "            return None",
  "        if False:\n            return None",
  ["tests/integration/test_extension.py", "tests/unit/readpath/test_pipeline.py",
   "tests/integration/test_netns_fleet.py::test_one_refresh_per_key_per_window_across_the_hosts"]),
 ("M10 the fence dropped", "service/readpath/tiers.py",
  "cas=claim.fence)\n        except CacheUnavailable:",
  "cas=None)\n        except CacheUnavailable:",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py"]),
 ("M11 the reader blocked by its refresh", "service/readpath/region.py",
  "        return self.refresher.schedule(\n"
  "            job.key, lambda: self.loader.refresh(job, self.never, seen), job.source)",
  "        self.loader.refresh(job, self.never, seen)\n        return True",
  ["tests/unit/readpath/test_pipeline.py",
   "tests/integration/test_netns_fleet.py::test_one_refresh_per_key_per_window_across_the_hosts"]),
 ("M12 a lost entry waits (no last good copy)", "service/readpath/region.py",
  "            lost = self._lost(job, look)",
  "            lost = None",
  ["tests/unit/readpath/test_pipeline.py", "tests/integration/test_load_protocol.py",
   "tests/integration/test_netns_fleet.py::test_a_node_killed_under_load"]),
 ("M13 a generation restored from the remembered number", "service/readpath/generations.py",
  "                value = self._restart(family)\n",
  "                value = cached[0] if cached is not None "
  "else self._restart(family)\n"
  "                self.store.add_counter(_key(family), value)\n",
  ["tests/unit/readpath/test_generations.py", "tests/integration/test_load_protocol.py"]),
 # nginx in front (deploy/nginx.conf): its copy must never outlive the service's windows.
 # A host cut off from a key's server keeps its own newer copy when the server answers again.
 ("OWN1 memcached's older copy replaces a worker's own newer one", "service/readpath/tiers.py",
  "        if item.entry.stored_at <= found.entry.stored_at + AGE_SLACK:\n            return None",
  "        return None",
  ["tests/unit/readpath/test_own_copy.py",
   "tests/integration/test_netns_fleet.py::test_a_host_cut_from_a_cold_keys_node_never_goes_back_in_time"]),
 ("OWN2 an own copy of another epoch written over an invalidation", "service/readpath/tiers.py",
  "        if item.entry.epoch != found.entry.epoch:\n            return None\n",
  "",
  ["tests/unit/readpath/test_own_copy.py"]),
 ("NGX1 nginx told the whole window, not what is left (Age ignored)",
  "service/flask/httpcache.py",
  "    return str(max(0, math.floor(entry.windows.max_age) - age - 1))",
  "    return str(math.floor(entry.windows.max_age))",
  ["tests/integration/test_nginx.py::test_the_copy_nginx_keeps_never_outlives_the_services_windows"]),
 ("NGX2 nginx serves stale on error with no time limit", "deploy/nginx.conf",
  "            proxy_cache swr_cache;\n",
  "            proxy_cache swr_cache;\n            proxy_cache_use_stale error timeout updating;\n",
  ["tests/integration/test_nginx.py::test_a_stale_copy_is_answered_on_error_only_within_stale_if_error"]),
 ("NGX3 nginx revalidates (a 304's max-age taken as new freshness)", "deploy/nginx.conf",
  "            proxy_cache swr_cache;\n",
  "            proxy_cache swr_cache;\n            proxy_cache_revalidate on;\n",
  ["tests/integration/test_nginx.py::test_the_copy_nginx_keeps_never_outlives_the_services_windows"]),
 ("NGX4 nginx's first stale reader waits for the update", "deploy/nginx.conf",
  "proxy_cache_background_update on;", "proxy_cache_background_update off;",
  ["tests/integration/test_nginx.py::test_a_stale_copy_is_answered_at_once_while_one_request_updates_it"]),
 ("NGX5 nginx caches answers without Cache-Control", "deploy/nginx.conf",
  "            proxy_cache swr_cache;\n",
  "            proxy_cache swr_cache;\n            proxy_cache_valid any 1m;\n",
  ["tests/integration/test_nginx.py::test_what_the_service_passes_uncached_is_never_stored"]),
 ("NGX6 nginx ignores Set-Cookie and Cache-Control", "deploy/nginx.conf",
  "            proxy_cache swr_cache;\n",
  "            proxy_cache swr_cache;\n"
  "            proxy_ignore_headers Set-Cookie Cache-Control;\n",
  ["tests/integration/test_nginx.py::test_private_no_store_and_set_cookie_answers_are_never_stored"]),
 ("NGX7 nginx runs out of connections before the slow clients do", "deploy/nginx.conf",
  "worker_connections 16384;", "worker_connections 128;",
  ["tests/integration/test_nginx.py::test_slow_clients_are_held_by_nginx_not_by_gunicorn"]),
 ("O1 the workers keep their metrics apart (no multiprocess directory)",
  "service/gunicorn/conf.py",
  '        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir\n',
  '        pass\n',
  ["tests/integration/test_user_gunicorn.py"]),
 ("O2 the master leaves its metrics directory behind", "service/gunicorn/conf.py",
  "        shutil.rmtree(_own_metrics_dir, ignore_errors=True)",
  "        pass",
  ["tests/integration/test_user_gunicorn.py"]),
 ("O3 a dead worker's live gauges kept", "service/gunicorn/conf.py",
  "    multiprocess.mark_process_dead(worker.pid)",
  "    pass",
  ["tests/integration/test_user_gunicorn.py"]),
 ("CLI1 flask swr answers without asking memcached first", "service/flask/cli.py",
  "        check_memcached(st)\n",
  "        pass\n",
  ["tests/integration/test_cli.py"]),
 # Counters (service/http/counters.py): every number handed out is unique.
 ("CNT1 a lost counter starts again at 0", "service/http/counters.py",
  "    return server_time * PER_SECOND\n", "    return 0\n",
  ["tests/integration/test_counters.py::"
   "test_no_number_is_handed_out_twice_across_a_freeze_and_a_restart"]),
 ("CNT2 no wait for the server's clock to tick", "service/http/counters.py",
  "    if server_time <= first_time:\n", "    if False:\n",
  ["tests/integration/test_counters.py::"
   "test_a_counter_lost_in_the_second_it_was_created_does_not_start_there_again"]),
 ("CNT3 garbage replaced by a blind set, not a CAS", "service/http/counters.py",
  'if self._call(mkey, "cas", partial(_cas, mkey, start, token)):',
  'if self._call(mkey, "set", lambda c: c.set(mkey, start, 0, noreply=False)):',
  ["tests/integration/test_counters.py::"
   "test_anything_else_under_a_counter_is_replaced_never_repeated"]),
 ("CNT4 the counter's timeout shorter than a TCP retransmission", "service/http/counters.py",
  "TIMEOUT: Final = 1.0", "TIMEOUT: Final = 0.25",
  ["tests/integration/test_counters.py::test_an_increment_survives_a_lost_segment"]),
 ("CNT5 a key moves off a server whose circuit is open", "service/memcache/clients.py",
  '        return max(self.servers, key=lambda s: (score(f"{s}-{name}"), s))',
  "        alive = [s for s in self.servers if not self.breakers[s].is_open]\n"
  '        return max(alive or self.servers, key=lambda s: (score(f"{s}-{name}"), s))',
  ["tests/integration/test_counters.py::test_a_counter_never_moves_to_another_server"]),
 ("A1 the admin's CSRF token never rotates", "service/admin/routes.py",
  'return _sign(token, f"swr-cache admin csrf:{session}")',
  'return _sign(token, "swr-cache admin csrf")',
  ["tests/integration/test_admin_session.py"]),
 ("A2 a registry record's time taken on trust", "service/admin/registry.py",
  "text(rec.get(\"o\"), False) and when(rec.get(\"t\")) is not None):",
  "text(rec.get(\"o\"), False) and rec.get(\"t\") is not None):",
  ["tests/integration/test_admin_hostile.py"]),
 # large values: shared reads, a turn of the loop per piece, bodies sent in pieces.
 ("BIG1 every reader of a large value fetches and decodes its own copy",
  "service/memcache/chunks.py",
  "    flight = _flights.get(flight_key)\n",
  "    flight = None\n",
  ["tests/integration/test_big_values.py", "tests/unit/memcache/test_large_values.py"]),
 ("BIG2 a large value's pieces fetched and hashed without a turn for the hub",
  "service/memcache/chunks.py",
  "        # One piece per turn of the loop: the worker's other requests run in between.\n"
  "        gevent.sleep(0)\n",
  "",
  ["tests/unit/memcache/test_large_values.py"]),
 ("BIG3 a large entry written encoded again for the local tier", "service/readpath/tiers.py",
  "self.local.put(key, entry, self.monotonic(), stored.cas, stored.size)",
  "self.local.put(key, entry, self.monotonic(), stored.cas)",
  ["tests/integration/test_big_values.py"]),
 ("BIG4 a large cached body handed to the server in one piece", "service/flask/responses.py",
  "    if len(body) < STREAMED_FROM:\n",
  "    if True:\n",
  ["tests/integration/test_big_values.py"]),
 ("M14 no fair turn: a keep-alive connection never yields", "service/gunicorn/worker.py",
  "        next_turn()\n        iteration, run, began = loop.iteration, 0, clock()",
  "        iteration, run, began = loop.iteration, 0, clock()",
  ["tests/unit/gunicorn/test_worker.py",
   "tests/integration/test_fairness.py::"
   "test_a_connection_with_requests_always_waiting_does_not_starve_the_others"]),
 ("M15 a fair turn after every answer, ready or not", "service/gunicorn/worker.py",
  "    if run and (run >= allowed_run(others_ready(loop)) or now - began >= RUN_SECONDS):",
  "    if True:",
  ["tests/unit/gunicorn/test_worker.py"]),
 ("M17 a run of slow answers is bounded by count only", "service/gunicorn/worker.py",
  "    if run and (run >= allowed_run(others_ready(loop)) or now - began >= RUN_SECONDS):",
  "    if run and run >= allowed_run(others_ready(loop)):",
  ["tests/unit/gunicorn/test_worker.py::"
   "test_a_run_of_slow_answers_waits_for_the_next_turn_after_the_first"]),
 ("M18 a run of cheap answers is bounded by time only", "service/gunicorn/worker.py",
  "    if run and (run >= allowed_run(others_ready(loop)) or now - began >= RUN_SECONDS):",
  "    if run and now - began >= RUN_SECONDS:",
  ["tests/unit/gunicorn/test_worker.py::"
   "test_answers_before_the_loop_ran_wait_for_the_next_turn_after_a_bounded_run"]),
 ("M19 a run as long whatever waits behind it", "service/gunicorn/worker.py",
  "    return min(BACK_TO_BACK, max(1, ANSWERS_AHEAD // max(1, ready)))",
  "    return BACK_TO_BACK",
  ["tests/unit/gunicorn/test_worker.py::"
   "test_with_many_connections_ready_a_second_answer_waits_for_the_next_turn"]),
 ("M20 the turn's greenlets not counted as ready", "service/gunicorn/worker.py",
  "            self.behind = len(waiting) - i - 1\n",
  "",
  ["tests/unit/gunicorn/test_worker.py::"
   "test_others_ready_counts_the_greenlets_waiting_for_a_turn"]),
 ("OS1 the head sent on its own again", "service/gunicorn/onesend.py",
  "                self.sock.holding = True",
  "                pass",
  ["tests/unit/gunicorn/test_onesend.py"]),
 ("OS2 a head without body bytes left waiting", "service/gunicorn/onesend.py",
  "            self.sock.flush()   # a response with no body bytes: its head alone",
  "            pass",
  ["tests/unit/gunicorn/test_onesend.py"]),
 ("OS3 the kernel's sendfile overtakes the head", "service/gunicorn/onesend.py",
  "    def __getattr__(self, name: str) -> Any:\n        self.flush()\n",
  "    def __getattr__(self, name: str) -> Any:\n",
  ["tests/unit/gunicorn/test_onesend.py"]),
 ("M16 the hub monitor never sees a blocked hub", "service/observe/monitor.py",
  "time.perf_counter() - beat > self.threshold + self.period:",
  "time.perf_counter() - beat > self.threshold + self.period + 3600:",
  ["tests/integration/test_observability.py::"
   "test_a_blocked_hub_is_counted_and_logged_with_its_stack"]),
]


def main(only: list[str]) -> int:
    """Apply each wrong change, run its tests, undo it; non-zero if one stayed green."""
    survivors = 0
    for name, path, old, new, tests in MUTANTS:
        if only and name.split()[0] not in only:
            continue
        source = ROOT / path
        original = source.read_text()
        if original.count(old) != 1:
            print(f"SKIP  {name}: the code it changes is not there (update this list)")
            survivors += 1
            continue
        source.write_text(original.replace(old, new))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "--timeout", "60",
                 "-p", "no:cacheprovider", *tests],
                cwd=ROOT, capture_output=True, text=True, timeout=900)
        finally:
            source.write_text(original)
        summary = [line for line in run.stdout.splitlines()
                   if line.startswith("FAILED") or " passed" in line or " failed" in line]
        print("RED  " if run.returncode else "GREEN", name, "|", " ".join(summary[-2:])[:300],
              flush=True)
        survivors += run.returncode == 0
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
