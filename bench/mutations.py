"""Mutation check: plant known bugs, one at a time, in a copy of the repository and see whether the tests catch them.

    python bench/mutations.py [--only NAME ...] [--timeout 600] [--no-baseline] [--json]

Each mutation is (name, file, exact old text, new text, tests to run; optionally more edits of the same file). Each
old text must occur exactly once in the
file (tests/test_mutations_list.py checks that in the default run, so the list cannot silently rot). For each
mutation the repository (tracked and untracked, not ignored files) is copied to a temporary folder, the text is
replaced there, and the named tests run in that copy with it first on PYTHONPATH (rank subprocesses inherit it).
A mutation is "caught" when pytest reports a failure; "error" when pytest could not run the tests at all.
The named tests run unmutated first (the baseline), since a failure there would make every mutation look caught.
Prints a table (or JSON) and exits 1 when any mutation was missed or errored. Not part of the default pytest run:
it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEM_TENSOR = ["tests/test_parallel_nemotron_h.py::test_split_matches_single_process[f32-tensor-2]",
              "tests/test_parallel_nemotron_h.py::test_split_matches_single_process[4bit-tensor-4]"]
NEM_TENSOR_2 = NEM_TENSOR[:1]
DOC_CACHE = ["tests/test_docjob.py::test_every_cached_answer_equals_a_from_scratch_prefill"]
OWN = "tests/test_rank_ownership.py"
ROUTED_F32 = ["tests/test_parallel_nemotron_h.py::test_moe_routed_sum_is_accumulated_in_float32"]
DISK_KEY = ["tests/test_resident_cache.py::test_the_disk_refuses_another_split_other_weights_and_other_template_flags"]


@dataclass
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: list[str] = field(default_factory=list)
    note: str = ""
    more: list[tuple[str, str]] = field(default_factory=list)  # further (old, new) edits in the same file

    def edits(self) -> list[tuple[str, str]]:
        return [(self.old, self.new), *self.more]


def _wrong_rank(param: str) -> tuple[str, str]:
    return f"m.{param} = _part(m.{param}, n, r)", f"m.{param} = _part(m.{param}, n, (r + 1) % n)"


API, SERVER = "arthur_cluster/parallel/api.py", "arthur_cluster/parallel/server.py"


def _ep(test: str, ranks: str = "1-rank") -> str:
    return f"tests/test_openai_endpoint.py::{test}[{ranks}]"


def _ho(test: str, ranks: str = "1-rank") -> str:
    return f"tests/test_openai_hostile.py::{test}[{ranks}]"


MUTATIONS: list[Mutation] = [
    # Tensor-parallel NemotronH: a parameter of a Mamba layer taken from the wrong rank's share.
    Mutation("mamba D from the wrong rank", "arthur_cluster/parallel/nemotron_h.py", *_wrong_rank("D"), NEM_TENSOR_2),
    Mutation("mamba dt_bias from the wrong rank", "arthur_cluster/parallel/nemotron_h.py", *_wrong_rank("dt_bias"),
             NEM_TENSOR_2),
    Mutation("mamba A_log from the wrong rank", "arthur_cluster/parallel/nemotron_h.py", *_wrong_rank("A_log"),
             NEM_TENSOR_2),
    Mutation("gated norm weight from the wrong rank", "arthur_cluster/parallel/nemotron_h.py",
             *_wrong_rank("norm.weight"), NEM_TENSOR_2),
    Mutation("conv1d bias from the wrong rank", "arthur_cluster/parallel/nemotron_h.py",
             'conv["bias"] = _part(m.conv1d.bias, n, r, 0, [inner, inner + gs])',
             'conv["bias"] = _part(m.conv1d.bias, n, (r + 1) % n, 0, [inner, inner + gs])', NEM_TENSOR_2),
    Mutation("miniatures keep mlx-lm's initial values", "arthur_cluster/miniature.py",
             "    randomize(model, config)\n", "",
             ["tests/test_parallel_nemotron_h.py::test_miniature_parameters_are_random_and_experts_run_on_every_rank"]),
    Mutation("a model file imports the registry again (import circle)", "arthur_cluster/parallel/nemotron_h.py",
             "from .split import ShardingError, pipeline_split, tensor_blockers",
             "from .registry import ShardingError, pipeline_split, tensor_blockers",
             ["tests/test_parallel_nemotron_h.py::test_imports_run_one_way"]),
    # Tensor-parallel MoE: each expert's width cut across the ranks.
    Mutation("expert width shares overlap by one group", "arthur_cluster/parallel/nemotron_h.py",
             "return slice(r * units // n * unit, (r + 1) * units // n * unit)",
             "return slice(r * units // n * unit, ((r + 1) * units // n + 1) * unit)", NEM_TENSOR),
    Mutation("every rank takes the first share of the width", "arthur_cluster/parallel/nemotron_h.py",
             's = _cut(int(up["weight"].shape[-2]), unit, n, r)', 's = _cut(int(up["weight"].shape[-2]), unit, n, 0)',
             NEM_TENSOR_2),
    Mutation("expert outputs rounded to float16 (tolerance)", "arthur_cluster/parallel/nemotron_h.py",
             "return (self.switch_mlp(h, inds) * scores.astype(mx.float32)[..., None]).sum(axis=-2)",
             "return (self.switch_mlp(h, inds) * scores.astype(mx.float32)[..., None]).sum(axis=-2)"
             ".astype(mx.float16).astype(mx.float32)", NEM_TENSOR_2,
             "small error, same ids: caught only by a tolerance near float32 rounding"),
    Mutation("routed-expert sum accumulated in bf16 (the activation dtype)", "arthur_cluster/parallel/nemotron_h.py",
             "scores.astype(mx.float32)[..., None]).sum(axis=-2)", "scores.astype(h.dtype)[..., None]).sum(axis=-2)",
             ROUTED_F32),
    # The resident prefix cache's disk key (parallel/prefix.py).
    Mutation("disk key leaves out the pipeline layer range", "arthur_cluster/parallel/prefix.py",
             'return f"{files}:{route}:{rank}/{size}:layers={span}"', 'return f"{files}:{route}:{rank}/{size}"',
             DISK_KEY),
    Mutation("disk key leaves out the template flags", "arthur_cluster/parallel/prefix.py",
             'h = hashlib.sha256(f"{FORMAT}:resident:{self.identity}:{flags}:".encode())',
             'h = hashlib.sha256(f"{FORMAT}:resident:{self.identity}:".encode())', DISK_KEY,
             more=[('and meta.get("flags") == flags ', '')]),
    Mutation("weight files known by size and mtime only", "arthur_cluster/parallel/prefix.py",
             'h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}".encode())',
             'h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())', DISK_KEY),
    Mutation("the kept documents are searched for the last one only", "arthur_cluster/parallel/prefix.py",
             "        for e in self.entries:\n            if e.flags != flags:",
             "        for e in self.entries[-1:]:\n            if e.flags != flags:",
             ["tests/test_resident_cache.py::test_three_documents_interleaved_each_cached_answer_equals_a_scratch_run"]),
    Mutation("the most recently used document is dropped first", "arthur_cluster/parallel/prefix.py",
             "            self.entries.pop(0)", "            self.entries.pop(-2)",
             ["tests/test_resident_cache.py::test_documents_beyond_the_budget_go_least_recently_used_first"]),
    # The prefix cache restoring a document between questions (parallel/prefix.py, as document jobs use it).
    Mutation("mamba state not restored", "arthur_cluster/parallel/prefix.py",
             "                c.state = ([_copy(x) for x in saved[0]], *saved[1:])", "                pass", DOC_CACHE),
    Mutation("only the SSM state restored (conv state stale)", "arthur_cluster/parallel/prefix.py",
             "                c.state = ([_copy(x) for x in saved[0]], *saved[1:])",
             "                c.state = ([c.state[0][0], *[_copy(x) for x in saved[0][1:]]], *saved[1:])", DOC_CACHE),
    Mutation("KV trimmed one token short", "arthur_cluster/parallel/prefix.py",
             "c.trim(c.offset - start)", "c.trim(c.offset - start - 1)", DOC_CACHE),
    Mutation("no restore at all", "arthur_cluster/parallel/prefix.py",
             "        for c, saved in zip(best.cache, best.points[start]):", "        for c, saved in []:", DOC_CACHE),
    Mutation("the request's template flag left out of the prefix cache's key", "arthur_cluster/parallel/server.py",
             "thinking=0 if r.enable_thinking is None else 1 + int(r.enable_thinking))", "thinking=0)",
             ["tests/test_mlx_engine.py::test_the_engine_in_this_process_streams_text_stats_and_progress"]),
    Mutation("the disk write in the way of the next question", "arthur_cluster/parallel/server.py",
             "            engine.finish(info)\n        r.pc.keep_to_budget()", "            engine.finish(info)\n        r.pc.flush()",
             ["tests/test_mlx_engine.py::test_a_prefix_asked_twice_is_written_to_disk_once_the_engine_is_idle_not_before_the_next_question"]),
    Mutation("the document's end is not kept as a restore point", "arthur_cluster/parallel/prefix.py",
             "        return (done % self.block == 0 and done > total - self.window) or done == self.extra",
             "        return done % self.block == 0 and done > total - self.window", DOC_CACHE),
    # Ranks, linker, registry.
    Mutation("RankProcesses.kill does nothing", "arthur_cluster/parallel/ranks.py",
             "        if not self.procs:\n            return\n        alive = [",
             "        return\n        alive = [",
             ["tests/test_parallel_nemotron_h.py::test_rank_killed_mid_run_ends_the_job"],
             "the probe's launcher: a rank killed mid-run must take the others with it"),
    Mutation("linker copies the blobs instead of linking", "arthur_cluster/linker.py",
             'os.symlink(os.path.join(source, f["name"]), blob)',
             '__import__("shutil").copyfile(os.path.join(source, f["name"]), blob)',
             ["tests/test_linker_hub.py::test_delete_whole_repo_keeps_sources",
              "tests/test_linker_hub.py::test_prune_detached_revision_keeps_sources"]),
    Mutation("linker copies, and its own verification is fooled", "arthur_cluster/linker.py",
             'os.symlink(os.path.join(source, f["name"]), blob)',
             '__import__("shutil").copyfile(os.path.join(source, f["name"]), blob)',
             ["tests/test_linker_hub.py::test_delete_whole_repo_keeps_sources",
              "tests/test_linker_hub.py::test_prune_detached_revision_keeps_sources"],
             "what only the tests' own link checks can see",
             more=[("        if not links_ok:\n", "        if False:\n")]),
    # Bring-up across hosts (tests/test_hosts.py: real namespaced hosts, where namespaces are permitted).
    Mutation("a node's program by bare name", "arthur_cluster/hostfile.py",
             "    if not setting:\n        return own_program()", "    if True:\n        return [\"arthur-cluster\"]",
             ["tests/test_hosts.py::test_pipeline_across_two_hosts_each_from_its_own_home_then_doc_and_down",
              "tests/test_bringup.py::test_weights_on_other_nodes_are_linked_over_ssh"]),
    Mutation("rank 0 listens on 0.0.0.0 across hosts", "arthur_cluster/parallel/resident.py",
             "    bind = check_bind(bind, across) or _rank0_address(hosts if across else None)",
             "    bind = check_bind(bind, across) or (\"0.0.0.0\" if across else \"127.0.0.1\")",
             ["tests/test_hosts.py::test_pipeline_across_two_hosts_each_from_its_own_home_then_doc_and_down"]),
    Mutation("the control port on 0.0.0.0", "arthur_cluster/parallel/resident.py",
             '"--control-bind", address,', '"--control-bind", "0.0.0.0",',
             ["tests/test_hosts.py::test_pipeline_across_two_hosts_each_from_its_own_home_then_doc_and_down"]),
    Mutation("a node's error is its login profile's last stderr line", "arthur_cluster/hostfile.py",
             "    raise NodeError(node, argv, _own_error(out, own, done.returncode), ran=True)",
             "    raise NodeError(node, argv, _last_line(err.replace(MARK, \"\") or out), ran=True)",
             ["tests/test_hosts.py::test_a_node_without_the_model_is_named_with_its_own_error_then_the_fallback"]),
    Mutation("the single-node route links on the other nodes", "arthur_cluster/bringup.py",
             "folders=folders) if choice.route.nodes > 1 else []", "folders=folders)",
             ["tests/test_hosts.py::test_a_node_without_the_model_is_named_with_its_own_error_then_the_fallback"]),
    Mutation("nodes at localhost go through ssh", "arthur_cluster/bringup.py",
             "    if all(n.local for n in nodes):\n        return []", "    if False:\n        return []",
             ["tests/test_hosts.py::test_two_ranks_on_this_machine_go_without_ssh_then_doc_and_down"]),
    Mutation("a rejection told again after each fallback", "arthur_cluster/bringup.py",
             "        if r not in out:\n            out.append(r)", "        if True:\n            out.append(r)",
             ["tests/test_hosts.py::test_a_node_without_the_model_is_named_with_its_own_error_then_the_fallback"]),
    Mutation("--bind not checked", "arthur_cluster/parallel/resident.py",
             "    if bind is None:\n        return None\n    try:", "    if True:\n        return bind\n    try:",
             ["tests/test_hosts.py::test_up_refuses_a_bind_that_is_not_an_address"]),
    Mutation("supported() ignores mlx-lm's model remapping", "arthur_cluster/parallel/registry.py",
             "    module = module_of(model_type)\n    own = OWN.get(module, {})",
             "    module = model_type\n    own = OWN.get(module, {})",
             ["tests/test_probe_static.py::test_model_types_mlx_lm_remaps_use_their_module"]),
    # The OpenAI endpoint (parallel/api.py over parallel/server.py): what a client receives.
    Mutation("api: new text read twice from the detokenizer (empty answers)", API,
             "        self.detok.add_token(tid)\n        return self._scan(",
             "        self.detok.add_token(tid)\n        self.detok.last_segment\n        return self._scan(",
             [_ep("test_greedy_text_equals_mlx_lm_server_and_is_not_empty")]),
    Mutation("api: finish_reason 'stop' when max_tokens cut the answer", SERVER,
             '    finish = "length"\n    while total - done > 1:', '    finish = "stop"\n    while total - done > 1:',
             [_ep("test_length_exactly_when_max_tokens_cut")]),
    Mutation("api: stream chunks typed chat.completion", API,
             'obj = "chat.completion.chunk" if chat else "text_completion"',
             'obj = "chat.completion" if chat else "text_completion"', [_ep("test_stream_equals_whole")]),
    Mutation("api: temperature decoded wrongly on the other ranks", SERVER,
             "temperature=t, top_p=top_p, seed=", "temperature=t * 2, top_p=top_p, seed=",
             [_ep("test_sampling_seeds_n_and_temperature_reach_every_rank", "2-ranks")]),
    Mutation("api: seed left out of the broadcast", SERVER,
             "return [op, n, p.max_tokens, p.seed,", "return [op, n, p.max_tokens, 0,",
             [_ep("test_sampling_seeds_n_and_temperature_reach_every_rank", "2-ranks")]),
    Mutation("api: temperature multiplies the logits", SERVER,
             "scaled = logprobs * (1.0 / params.temperature)", "scaled = logprobs * params.temperature",
             [_ep("test_sampling_seeds_n_and_temperature_reach_every_rank")]),
    Mutation("api: unseeded requests all draw with seed 0", API,
             "else secrets.randbelow(SEED_MAX + 1)", "else 0",
             [_ep("test_sampling_seeds_n_and_temperature_reach_every_rank")]),
    Mutation("api: stop strings ignored", API,
             'pats = [(s, "stop") for s in self.stops]', "pats = []",
             [_ep("test_stop_strings_cut_the_text_and_finish_with_stop")]),
    Mutation("api: a client that leaves does not cancel its request", API,
             "            if c.finish is None:\n                self.engine.cancel(c.handle)",
             "            if c.finish is None:\n                pass",
             [_ho("test_clients_that_leave_cancel_their_requests")]),
    Mutation("api: a client that leaves is noticed only while no token arrives", API,
             "            if now >= check:  # also while tokens flow: a client that left must not wait for the whole "
             "answer", "            if ev is None and now >= check:",
             [_ho("test_clients_that_leave_cancel_their_requests")]),
    Mutation("api: no prompt-length check", API,
             "        if len(prompt) >= ctx:", "        if False:",
             [_ho("test_too_much_input_is_refused_naming_the_numbers")]),
    Mutation("api: body size not capped", API,
             "    if too_big or size > cap:", "    if False:",
             [_ho("test_too_much_input_is_refused_naming_the_numbers")]),
    Mutation("api: unbounded queue", SERVER,
             "            if len(self.waiting) >= self.max_queue:", "            if False:",
             [_ho("test_a_full_queue_answers_429_and_health_says_busy")]),
    Mutation("api: a caller's template arguments accepted", API,
             "    model_config = _STRICT\n    enable_thinking", "    model_config = ConfigDict(extra='allow')\n    enable_thinking",
             [_ho("test_hostile_json_bodies_are_answered_and_the_next_request_is_right")]),
    Mutation("api: a connection sending its headers forever is never closed", API,
             "        if self.cycle is seen and self._is_idle():\n            self.transport.close()",
             "        if self.cycle is seen and self._is_idle():\n            pass",
             [_ho("test_idle_connections_are_capped_and_normal_clients_still_get_in")]),
    Mutation("api: idle connections never make room", API,
             "            (idle or self).transport.close()", "            pass",
             [_ho("test_idle_connections_are_capped_and_normal_clients_still_get_in")]),
    # Resident ranks: only provable ranks are signalled, the control port admits only the deployment's ranks,
    # records stay private, and ranks stay visible without a readable record.
    Mutation("down signals a process that lacks the deployment's id", "arthur_cluster/parallel/ownership.py",
             '    if f"--deployment {deployment}" not in p.command:\n', "    if False:\n",
             [f"{OWN}::test_down_signals_nothing_a_hostile_record_names[reused]"]),
    Mutation("down signals another user's process", "arthur_cluster/parallel/ownership.py",
             "    if p.uid != os.getuid():\n", "    if False:\n",
             [f"{OWN}::test_down_signals_nothing_a_hostile_record_names[other-user]"]),
    Mutation("down ignores the recorded start time (a reused PID)", "arthur_cluster/parallel/ownership.py",
             "    if start and p.start != start:\n", "    if False:\n",
             [f"{OWN}::test_down_signals_nothing_a_hostile_record_names[reused-other-start]"]),
    Mutation("pids 0 and 1 pass as ranks' pids", "arthur_cluster/parallel/ownership.py",
             "    if type(pid) is not int or pid <= 1:\n", "    if type(pid) is not int or pid < 0:\n",
             [f"{OWN}::test_down_signals_nothing_a_hostile_record_names[one]",
              f"{OWN}::test_down_signals_nothing_a_hostile_record_names[zero]"]),
    Mutation("control port trusts a hello without checking its HMAC", "arthur_cluster/parallel/control.py",
             "        if not hmac.compare_digest(mac, _mac(self.secret, \"hello\", nonce, theirs, rank, pid, host)):\n",
             "        if False:\n",
             [f"{OWN}::test_forged_and_malformed_hellos_are_dropped_and_only_the_real_ranks_join"]),
    Mutation("control port takes any JSON value as a hello", "arthur_cluster/parallel/control.py",
             "    if not isinstance(obj, dict):\n        raise Refused(", "    if False:\n        raise Refused(",
             [f"{OWN}::test_forged_and_malformed_hellos_are_dropped_and_only_the_real_ranks_join"]),
    Mutation("the rank does not inherit its lock (ranks vanish with the record)", "arthur_cluster/parallel/resident.py",
             "pass_fds=(lock.fd,) if lock else ()", "pass_fds=()",
             [f"{OWN}::test_a_corrupt_record_is_reported_down_still_stops_the_ranks_and_up_never_runs_two_copies"]),
    Mutation("up does not look for ranks no record describes", "arthur_cluster/bringup.py",
             "    found += resident.unrecorded({r.deployment for r in found})\n", "",
             [f"{OWN}::test_a_corrupt_record_is_reported_down_still_stops_the_ranks_and_up_never_runs_two_copies"]),
    Mutation("the deployment record (with the token) written at the umask's mode", "arthur_cluster/bringup.py",
             'paths.write_atomic(path, dep.model_dump_json(indent=2) + "\\n", mode=0o600)',
             'paths.write_atomic(path, dep.model_dump_json(indent=2) + "\\n")',
             [f"{OWN}::test_records_are_private_and_another_user_cannot_read_the_token"]),
    Mutation("a state folder left readable by others", "arthur_cluster/paths.py",
             "        os.chmod(path, 0o700)\n", "        pass\n",
             [f"{OWN}::test_records_are_private_and_another_user_cannot_read_the_token"]),
    Mutation("doctor names loading ranks without their pids", "arthur_cluster/parallel/resident.py",
             'are still loading (processes {alive})"', 'are still loading"',
             [f"{OWN}::test_up_serve_killed_at_seeded_points_is_always_listed_by_doctor_and_stopped_by_down"],
             "takes minutes: 20 kills of `up --serve`"),
    Mutation("ps cuts the command line short (macOS proof)", "arthur_cluster/parallel/ownership.py",
             '["ps", "-ww", "-o"', '["ps", "-o"',
             [f"{OWN}::test_a_process_is_proved_by_uid_start_time_and_the_deployment_id"]),
    Mutation("any JSON at a stale record's port taken for rank 0's health", "arthur_cluster/parallel/resident.py",
             "    return body if isinstance(body, dict) else None", "    return body",
             [f"{OWN}::test_whatever_now_listens_at_a_stale_records_port_is_not_taken_for_rank_0"]),
    # Bugs that once went through the suite (tests/test_planted_bugs.py and the CLI tests catch them now).
    Mutation("doc --summarize: every kind's label built eagerly", "arthur_cluster/docjob.py",
             '        if self.kind == "summarize":\n            return "Summary"\n',
             '        _ = self.text.splitlines()[0]\n        if self.kind == "summarize":\n            return "Summary"\n',
             ["tests/test_cli_output.py::test_doc_summarize_and_its_resume"]),
    Mutation("doc --thinking off dropped from the prompt", "arthur_cluster/docjob.py",
             'kw = {} if self.thinking is None else {"enable_thinking": self.thinking}',
             'kw = {} if not self.thinking else {"enable_thinking": self.thinking}',
             ["tests/test_planted_bugs.py::test_thinking_off_reaches_the_rendered_prompt"]),
    Mutation("doc --thinking off read as the template default", "arthur_cluster/commands/doc.py",
             '    return v == "on"', '    return True if v == "on" else None',
             ["tests/test_planted_bugs.py::test_doc_thinking_off_is_in_the_plan"]),
    Mutation("target-inside-source check on abspath", "arthur_cluster/linker.py",
             "Path(os.path.realpath(child)).relative_to(os.path.realpath(parent))",
             "Path(os.path.abspath(child)).relative_to(os.path.abspath(parent))",
             ["tests/test_planted_bugs.py::test_a_target_reached_through_a_symlink_into_the_source_is_refused"]),
    Mutation("etag cache ignores mtime", "arthur_cluster/etags.py",
             'return f"{os.path.realpath(path)}\\0{size}\\0{mtime_ns}"', 'return f"{os.path.realpath(path)}\\0{size}"',
             ["tests/test_planted_bugs.py::test_a_same_size_rewrite_gets_a_new_true_etag"]),
    Mutation("an ambiguous short name picked silently", "arthur_cluster/modelname.py",
             "    if len(ids) > 1:", "    if len(ids) > 2:",
             ["tests/test_planted_bugs.py::test_an_ambiguous_short_name_is_refused_naming_both"]),
    Mutation("a node's planned total leaves out the Mamba state", "arthur_cluster/memory.py",
             "np_.total = np_.weights + np_.kv_cache + np_.mamba_state + np_.activation + np_.overhead",
             "np_.total = np_.weights + np_.kv_cache + np_.activation + np_.overhead",
             ["tests/test_planted_bugs.py::test_each_nodes_total_is_the_sum_of_its_parts"]),
    Mutation("a guarded error exits 2, not 1", "arthur_cluster/commands/_errors.py",
             '            _out.fail(text, as_json=bool(kwargs.get("as_json")))',
             '            _out.fail(text, code=2, as_json=bool(kwargs.get("as_json")))',
             ["tests/test_cli_errors.py::test_each_kind_prints_one_line_naming_the_file"]),
    Mutation("a rate with nothing timed printed as 0.0", "arthur_cluster/docjob.py",
             "return round(tokens / seconds, 2) if tokens > 0 and seconds > 0 else None",
             "return round(tokens / seconds, 2) if seconds > 0 else 0.0",
             ["tests/test_cli_output.py::test_a_rate_nothing_timed_is_absent_not_zero"]),
    Mutation("the progress rate counts the cached prefix", "arthur_cluster/commands/doc.py",
             "kw.update(base=done, since=time.monotonic())", "kw.update(base=0, since=time.monotonic())",
             ["tests/test_cli_output.py::test_the_progress_rate_counts_only_computed_tokens"]),
    Mutation("a plan gives a rate and says no rates were measured", "arthur_cluster/commands/doc.py",
             "    if plan.warmup_tps or plan.decode_tps:\n", "    if False:\n",
             ["tests/test_cli_output.py::test_the_time_line_never_gives_a_rate_and_says_none_was_measured"]),
    Mutation("fits ? left unexplained in a plan", "arthur_cluster/commands/doc.py",
             "        if any(n.fits is None for n in plan.memory.nodes):", "        if False:",
             ["tests/test_cli_output.py::test_fits_unknown_is_explained"]),
    Mutation("a question's markup swallowed", "arthur_cluster/commands/doc.py",
             'c.print(f"\\n[bold]{a[\'task\']}[/] {escape(title)}", highlight=False)',
             'c.print(f"\\n[bold]{a[\'task\']}[/] {title}", highlight=False)',
             ["tests/test_cli_output.py::test_user_text_with_brackets_is_printed_as_written"]),
    Mutation("help prints <bool> for flags", "arthur_cluster/commands/_help.py",
             "_no_type_for_flags(typer.core.TyperOption)\n", "",
             ["tests/test_cli_output.py::test_help_shows_no_python_types"]),
    Mutation("probe --route prints every route", "arthur_cluster/commands/probe.py",
             "    return [r for r in report.routes if spec.matches(r)]", "    return list(report.routes)",
             ["tests/test_cli_output.py::test_probe_route_prints_only_the_asked_routes"]),
    Mutation("a superscript node count reaches int()", "arthur_cluster/probe.py",
             "if not (parts[3].isascii() and parts[3].isdigit()) or int(parts[3]) < 1:",
             "if not parts[3].isdigit() or int(parts[3]) < 1:",
             ["tests/test_cli_output.py::test_probe_refuses_a_non_ascii_node_count_in_one_line"]),
    Mutation("a huge layer count reaches the pipeline split (MemoryError)", "arthur_cluster/parallel/split.py",
             "    if not 0 <= n <= MAX_LAYERS:", "    if False:",
             ["tests/test_cli_output.py::test_probe_of_a_huge_layer_count_names_the_cap"]),
    Mutation("pick names no model on disk", "arthur_cluster/fallback.py",
             "        if self.on_disk:  #", "        if False:  #",
             ["tests/test_cli_output.py::test_pick_with_the_stock_catalogue_names_a_model_on_disk"]),
    Mutation("pick names a linked model twice", "arthur_cluster/fallback.py",
             "    others = dict.fromkeys(f.repo_id", "    others = list(f.repo_id",
             ["tests/test_cli_output.py::test_pick_with_the_stock_catalogue_names_a_model_on_disk"]),
    Mutation("pick and up ignore --route (the default order instead)", "arthur_cluster/fallback.py",
             "    return [r for r in _routes(cluster, ROUTE_ORDER + ASKED_ONLY, n) if spec.matches(r)]",
             "    return _routes(cluster, ROUTE_ORDER, len(cluster.nodes))",
             ["tests/test_fallback.py::test_route_asked_for_is_the_only_one_tried_even_outside_the_default_order"]),
    Mutation("pick --route parsed but not passed on", "arthur_cluster/commands/cluster.py",
             "model=model, fallbacks=fallbacks, route=spec)", "model=model, fallbacks=fallbacks)",
             ["tests/test_fallback.py::test_pick_route_from_the_command_line"]),
    Mutation("up --route not passed to the pick", "arthur_cluster/bringup.py",
             "fallbacks=fallbacks, prior=prior, route=route)", "fallbacks=fallbacks, prior=prior)",
             ["tests/test_hosts.py::test_tensor_across_two_hosts_then_doc_and_down"]),
    Mutation("weights that cannot fit: smaller --max-tokens suggested", "arthur_cluster/docjob.py",
             "    no_room = memory_bound and work - plan.prompt_overhead - 5 < MIN_CHUNK",
             "    no_room = False",
             ["tests/test_cli_output.py::test_a_plan_whose_weights_cannot_fit_suggests_a_smaller_model_not_max_tokens"]),
    Mutation("models lists a linked model twice", "arthur_cluster/commands/models.py",
             '    return [r for r in rows if not (r["linked_entry"] and r["repo_id"] in sourced)]', "    return rows",
             ["tests/test_cli_friction.py::test_models_table_fits_80_columns_names_gguf_and_lists_each_model_once"]),
    Mutation("models prints no legend", "arthur_cluster/commands/models.py",
             "    c.print(textwrap.fill(LEGEND, WIDTH), highlight=False, markup=False, style=\"dim\")\n", "",
             ["tests/test_readme.py::test_every_documented_command_is_run",
              "tests/test_cli_friction.py::test_models_table_fits_80_columns_names_gguf_and_lists_each_model_once"],
             "the README test: the models step fails before exo is needed"),
    Mutation("an engine's last token dropped from a document answer", "arthur_cluster/docjob.py",
             '    return "".join(parts), first_at, stats, n', '    return "".join(parts[:-1]), first_at, stats, n',
             ["tests/test_resident.py::test_document_job_on_a_multi_node_deployment_prefills_the_document_once"],
             "the resident document test compares each answer with a from-scratch run"),
    # The exo client.
    Mutation("SSE line cap checked only at line end", "arthur_cluster/exo_client.py",
             "        if len(buf) > MAX_LINE:\n            raise ExoProtocolError(f\"{where} sent a line longer",
             "        if False:\n            raise ExoProtocolError(f\"{where} sent a line longer",
             ["tests/test_exo_faults.py::test_a_stream_line_past_the_cap_is_refused_while_it_grows_not_at_its_end"]),
    Mutation("exo without nodeBackends read as no Metal (v1.0.71)", "arthur_cluster/exo_client.py",
             '        if self.backends is not None:\n            return "MlxMetal" in self.backends',
             '        if True:\n            return "MlxMetal" in (self.backends or [])',
             ["tests/test_bringup.py::test_262k_tokens_on_two_48_gib_rdma_nodes_is_nemotron_tensor_over_jaccl_with_fused_attention"]),
    Mutation("a Running runner counted as not ready", "arthur_cluster/exo_client.py",
             'return self.status in ("Ready", "Running")', 'return self.status in ("Ready",)',
             ["tests/test_exo_faults.py::test_an_instance_whose_runners_are_running_is_ready_and_up_reuses_it"]),
]


@dataclass
class Outcome:
    name: str
    status: str  # caught | missed | error
    seconds: float
    detail: str = ""


def check_applies(m: Mutation, root: Path = ROOT) -> str | None:
    """Why this mutation no longer applies (None when its old text occurs exactly once)."""
    path = root / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    text = path.read_text(encoding="utf-8")
    for old, _ in m.edits():
        if (n := text.count(old)) != 1:
            return f"{m.file}: the old text {old.strip()[:40]!r} occurs {n} times, not once"
    return None


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(root: Path, tests: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    lines = [x for x in (p.stdout + p.stderr).strip().splitlines() if x.strip()]
    return p.returncode, lines[-1] if lines else ""


def run_one(m: Mutation, timeout: float) -> Outcome:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="arthur-mutant-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        if (why := check_applies(m, root)) is not None:
            return Outcome(m.name, "error", 0.0, why)
        path = root / m.file
        text = path.read_text(encoding="utf-8")
        for old, new in m.edits():
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")
        rc, last = run_tests(root, m.tests, timeout)
    # pytest: 1 = tests failed (caught), 0 = all passed (missed), anything else = it could not run them.
    status = {0: "missed", 1: "caught"}.get(rc, "error")
    return Outcome(m.name, status, round(time.monotonic() - t0, 1), last)


def baseline(tests: list[str], timeout: float) -> tuple[int, str]:
    with tempfile.TemporaryDirectory(prefix="arthur-baseline-") as tmp:
        copy_repo(Path(tmp))
        return run_tests(Path(tmp), tests, timeout)


def table(outcomes: list[Outcome]) -> str:
    width = max(len(o.name) for o in outcomes)
    rows = [f"| {'mutation'.ljust(width)} | result | seconds | pytest's last line",
            f"|{'-' * (width + 2)}|--------|---------|-------------------"]
    rows += [f"| {o.name.ljust(width)} | {o.status.ljust(6)} | {o.seconds:7.1f} | {o.detail}" for o in outcomes]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="run only mutations whose name contains one of these words")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's test run")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(w in m.name for w in args.only)]
    if not args.no_baseline:
        tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
        rc, last = baseline(tests, args.timeout)
        if rc != 0:
            print(f"the unmutated tests do not pass ({last}); fix them first", file=sys.stderr)
            return 2
    outcomes = []
    for m in chosen:
        outcomes.append(run_one(m, args.timeout))
        if not args.json:
            print(f"{outcomes[-1].status:6} {m.name}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=1))
    else:
        print(table(outcomes))
    return 0 if all(o.status == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
