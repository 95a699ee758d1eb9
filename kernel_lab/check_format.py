"""Stage 1's results as text (no MLX here: the evaluator's process formats what its children found)."""


def format_failure(result):
    """One line naming kernel, case, shape, dtype, what failed and the error."""
    f = result.get("failure")
    if not f:
        return f"{result['kernel']}: passed"
    if f["case"] is None:
        return f"{result['kernel']}: {f['error']}"
    return (f"{result['kernel']} failed on case {f['case']} [{f['shape']}], dtype {f['dtype']}, "
            f"{f['what']}: {f['error']}")


def format_table(results):
    """A short text table: kernel, ok, comparisons, max normalized error, seconds."""
    lines = [f"{'kernel':22s} {'ok':4s} {'cases':>5s} {'max err':>9s} {'time':>7s}"]
    for r in results:
        lines.append(f"{r['kernel']:22s} {'yes' if r['passed'] else 'NO':4s} {r['cases']:5d} "
                     f"{r['max_rel_err']:9.2e} {r['seconds']:6.2f}s")
    lines += [format_failure(r) for r in results if not r["passed"]]
    return "\n".join(lines)
