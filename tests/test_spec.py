"""Claims about the job file contract: strict, one-line reasons, and safe on hostile YAML."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from daemon.spec import (MAX_JOB_FILE_BYTES, JobFileError, JobSpec, check_name, json_schema, load_job_file,
                         parse_job, parse_job_bytes)

ROOT = Path(__file__).resolve().parents[1]

DESIGN_EXAMPLE = (Path(__file__).parent / "fixtures" / "design-plan.yaml").read_text()
ONE = "phases: [{phase: base}]\n"


def parse(text: str, filename: str = "job.yaml") -> JobSpec:
    return parse_job_bytes(text.encode(), filename=filename)


def reason(text: str, filename: str = "job.yaml") -> str:
    with pytest.raises(JobFileError) as e:
        parse(text, filename)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{filename}: ")
    return message


def test_design_example_plan_parses():
    spec = parse(DESIGN_EXAMPLE)
    assert spec.name == "d8-4060" and spec.model_tag == "d8" and spec.runner == "builtin"
    assert [p.phase for p in spec.phases] == ["base", "mid", "sft"]
    assert spec.phases[0].args["num_iterations"] == 3520 and spec.phases[0].args["core_metric_every"] == -1
    assert spec.recovery.stall_timeout == 600 and spec.recovery.startup_grace == 900
    assert spec.retention.keep_last == 3
    assert spec.phase_env(1) == {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "TORCH_COMPILE_DISABLE": "1"}


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "examples").glob("*.y*ml")), ids=lambda p: p.name)
def test_shipped_example_plans_parse(path):
    assert load_job_file(path).phases


def test_stored_spec_loads_back_unchanged():
    # the queue keeps model_dump(mode="json") and validates it again after a restart
    spec = parse(DESIGN_EXAMPLE)
    assert JobSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


def test_one_phase_file_is_a_one_phase_plan():
    spec = parse("phase: sft\nargs: {device_batch_size: 2}\nphase_env: {A: b}\nenv: {C: d}\n", "chat.yaml")
    assert spec.name == "chat" and len(spec.phases) == 1
    assert spec.phases[0].phase == "sft" and spec.phases[0].args == {"device_batch_size": 2}
    assert spec.phase_env(0) == {"C": "d", "A": "b"}


def test_phase_and_phases_together_are_refused():
    assert "either" in reason("phase: base\n" + ONE)


def test_name_defaults_to_the_file_stem_and_a_name_field_wins():
    assert parse(ONE, "my-run.v2.yaml").name == "my-run.v2"
    assert parse("name: other\n" + ONE, "my-run.yaml").name == "other"
    assert "file name 'My Run'" in reason(ONE, "My Run.yaml")


@pytest.mark.parametrize("text, field", [
    ("priority: '8'\n", "priority"),
    ("priority: true\n", "priority"),
    ("gpu: 1.0\n", "gpu"),
    ("retention: {keep_last: '3'}\n", "retention.keep_last"),
    ("recovery: {max_restarts_without_progress: '3'}\n", "recovery.max_restarts_without_progress"),
    ("recovery: {oom_backoff: 'true'}\n", "recovery.oom_backoff"),
    ("recovery: {oom_backoff: 1}\n", "recovery.oom_backoff"),
    ("env: {A: 1}\n", "env.A"),
    ("runner: 1\n", "runner"),
])
def test_strict_types_a_string_is_not_a_number(text, field):
    assert f"{field}:" in reason(ONE + text)


@pytest.mark.parametrize("arg", ["device_batch_size", "num_iterations", "max_seq_len", "depth"])
@pytest.mark.parametrize("value", ["'8'", "8.0", "true"])
def test_integer_trainer_flags_must_be_integers(arg, value):
    assert f"args.{arg} must be an integer" in reason(f"phases: [{{phase: base, args: {{{arg}: {value}}}}}]\n")


@pytest.mark.parametrize("text, where", [
    ("recovry: {}\n", "recovry: unknown key"),
    ("recovery: {stall_timout: 10m}\n", "recovery.stall_timout: unknown key"),
    ("retention: {keep: 3}\n", "retention.keep: unknown key"),
    ("runner: nanochat\nnanochat: {repo: /x, pyhton: py}\n", "nanochat.pyhton: unknown key"),
])
def test_unknown_keys_are_errors_at_every_level(text, where):
    assert where in reason(ONE + text)


def test_unknown_key_in_a_phase_is_an_error():
    assert "phases.0.argz: unknown key" in reason("phases: [{phase: base, argz: {}}]\n")


@pytest.mark.parametrize("name", ["a", "d8-4060", "run.v2", "x_y", "0", "a" * 64])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc", "-a", ".a", "_a", "A", "my job", "jöb",
                                  "a" * 65, "a\nb", "a\n", "abc\n", "a\x00", 5, None])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError):
        check_name(name)


def test_a_trailing_newline_does_not_slip_through_a_name_check():
    # `$` in a regex matches before a final newline: "a\n" must not become state/jobs/a\n.json
    assert "name 'x\\n'" in reason('name: "x\\n"\n' + ONE)
    assert "environment variable name" in reason(ONE + 'env: {"A\\n": x}\n')
    assert "argument name" in reason('phases: [{phase: base, args: {"depth\\n": 4}}]\n')


def test_path_traversal_in_the_name_field_is_refused():
    assert "name '../../etc'" in reason("name: ../../etc\n" + ONE)
    assert "model_tag" in reason("model_tag: ../d8\n" + ONE)


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("1h30m", 5400), ("90s", 90), ("250ms", 0.25),
                                           ("2d", 172800), (90, 90), (1.5, 1.5), ("45", 45)])
def test_durations(text, seconds):
    value = f"'{text}'" if isinstance(text, str) else text
    assert parse(ONE + f"recovery: {{stall_timeout: {value}}}\n").recovery.stall_timeout == seconds


@pytest.mark.parametrize("text", ["10 minutes", "-5", "0", "true", "10x", "m", "''", "[10]"])
def test_bad_durations_name_the_field(text):
    assert "recovery.stall_timeout" in reason(ONE + f"recovery: {{stall_timeout: {text}}}\n")


def test_dash_and_underscore_spellings_are_one_flag():
    spec = parse("phases: [{phase: base, args: {device-batch-size: 4}}]\n")
    assert spec.phases[0].args == {"device_batch_size": 4}
    assert "given twice" in reason("phases: [{phase: base, args: {device-batch-size: 4, device_batch_size: 2}}]\n")


def test_resume_from_step_is_nanods_to_set():
    assert "resume_from_step" in reason("phases: [{phase: base, args: {resume_from_step: 5}}]\n")


@pytest.mark.parametrize("text, words", [
    ("phases: [{phase: sft}, {phase: base}]\n", "order"),
    ("phases: [{phase: base}, {phase: base}]\n", "at most once"),
    ("phases: []\n", "phases"),
    ("name: x\n", "phases: Field required"),
    (ONE + "runner: nanochat\n", "nanochat: {repo: PATH}"),
    (ONE + "nanochat: {repo: /x}\n", "needs runner: nanochat"),
    (ONE + "retention: {keep_last: 1}\n", "retention.keep_last"),
    ("phases: [{phase: base, args: {device_batch_size: 0}}]\n", "device_batch_size must be at least 1"),
    ("phases: [{phase: sft, args: {max_seq_len: 64, max_tokens: 128}}]\n",
     "phases.sft.args.max_tokens=128 and phases.sft.args.max_seq_len=64 both set sft's row length"),
    (ONE + "env: {1BAD: x}\n", "environment variable name '1BAD'"),
])
def test_impossible_plans_are_refused(text, words):
    assert words in reason(text)


def test_sft_may_give_its_row_length_under_both_names_when_they_agree():
    spec = parse("phases: [{phase: sft, args: {max_seq_len: 64, max-tokens: 64}}]\n")
    assert spec.phases[0].args == {"max_seq_len": 64, "max_tokens": 64}


def test_model_tag_defaults_to_the_depth():
    assert parse("phases: [{phase: base, args: {depth: 12}}]\n").resolved_model_tag == "d12"
    assert parse(ONE).resolved_model_tag == "d20"


def test_arg_values_of_the_wrong_shape_are_named_once():
    message = reason("phases: [{phase: base, args: {lr: [1, 2]}}]\n")
    assert message.count("phases.0.args.lr") == 1 and "string, number or true/false" in message


# ---- hostile YAML ------------------------------------------------------------------------

def test_yaml_bomb_is_refused_quickly():
    bomb = "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9 if i else ['"lol"'] * 9) + "]\n"
                   for i in range(12))
    start = time.monotonic()
    assert "YAML bomb" in reason(bomb)
    assert time.monotonic() - start < 1.0


def test_a_few_anchors_and_aliases_are_fine():
    spec = parse("e: &e {A: b}\n".replace("e: &e", "env: &e") + "phases: [{phase: base, env: *e}]\n")
    assert spec.phases[0].env == {"A": "b"}


def test_deep_nesting_and_several_documents_and_duplicate_keys_are_refused():
    assert "nested more than" in reason("env: " + "[" * 200 + "]" * 200 + "\n")
    assert "more than one YAML document" in reason(ONE + "---\n" + ONE)
    assert "duplicate key 'priority'" in reason(ONE + "priority: 1\npriority: 2\n")


def test_reasons_are_one_short_line_even_when_they_quote_the_file():
    assert "bad\\nkey: unknown key" in reason('"bad\\nkey": 1\n' + ONE)
    assert len(reason("name: " + "k" * 100_000 + "\n" + ONE)) <= 400


def test_empty_and_non_mapping_files():
    assert "empty" in reason("")
    assert "no YAML" in reason("# only a comment\n")
    assert "mapping" in reason("- a\n")
    assert "not UTF-8" in str(pytest.raises(JobFileError, parse_job_bytes, b"\xff\xfe", filename="x.yaml").value)


def test_parse_job_wants_a_mapping():
    with pytest.raises(JobFileError, match="mapping"):
        parse_job([1, 2], default_name="x")


# ---- load_job_file -----------------------------------------------------------------------

def test_load_job_file_reads_a_file(tmp_path):
    (tmp_path / "d8.yaml").write_text(DESIGN_EXAMPLE)
    assert load_job_file(tmp_path / "d8.yaml").name == "d8-4060"


def test_load_job_file_refuses_a_huge_file_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(50 * 1024 * 1024)
    with pytest.raises(JobFileError, match=f"larger than {MAX_JOB_FILE_BYTES} bytes"):
        load_job_file(path)


def test_load_job_file_does_not_hang_on_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    outcome = []
    t = threading.Thread(target=lambda: outcome.append(pytest.raises(JobFileError, load_job_file,
                                                                      tmp_path / "fifo.yaml")), daemon=True)
    t.start()
    t.join(2)
    assert outcome and "not a regular file" in str(outcome[0].value)


def test_load_job_file_names_a_missing_file(tmp_path):
    with pytest.raises(JobFileError, match="nope.yaml: cannot read"):
        load_job_file(tmp_path / "nope.yaml")


# ---- the JSON Schema ---------------------------------------------------------------------

def test_json_schema_is_json_and_describes_phases_and_durations():
    schema = json.loads(json.dumps(json_schema()))
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "phases" in schema["properties"] and "phase" in schema["properties"]
    assert {"required": ["phases"]} in schema["anyOf"]
    stall = schema["$defs"]["Recovery"]["properties"]["stall_timeout"]
    assert {"number", "string"} <= {alt["type"] for alt in stall["anyOf"]}


def test_device_batch_size_may_be_auto_and_a_bad_one_is_refused_in_one_line():
    spec = parse("phases: [{phase: base, args: {device_batch_size: auto}}, {phase: mid, args: {device-batch-size: auto}}]\n")
    assert [p.args["device_batch_size"] for p in spec.phases] == ["auto", "auto"]
    assert reason("phases: [{phase: base, args: {device_batch_size: big}}]\n").endswith(
        "phases.base.args.device_batch_size must be an integer (at least 1) or auto, got 'big'")
    for bad in (0, -3):
        assert f"phases.base.args.device_batch_size must be at least 1, got {bad}" in \
            reason(f"phases: [{{phase: base, args: {{device_batch_size: {bad}}}}}]\n")
