"""The certificate's size and power: the exact test against Tango's score test, computed exactly.

For a grid of held-out sizes n and tolerances at 95% confidence, the actual false-certification rate of each
test: the largest probability, over positive-flip rates p_c on a grid, that it certifies a capability whose true
drop is exactly the tolerance (p_b = p_c + tolerance, the worst case of the null for both tests). Beside it, the
power for an unchanged-looking model (p_b = p_c = 0.005: it certifies this often). Everything comes from
``stats.certification_probability`` (trinomial enumeration over the rejection region), so there is no Monte
Carlo error. A timing block measures the exact certificate of one capability (bound, decision, inconclusive
threshold) from cold caches, at n = 400 with fewer than 30 flips each way, and ``needed_n`` for a few tables.

    python -m bench.size [--quick]   # prints JSON; `python -m bench --only size` writes RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import time

from safespec.certify import PairedCounts, stats, status_of

CONFIDENCE = 0.95
SIZES = (30, 50, 100, 200, 400, 1000)
TOLERANCES = (0.01, 0.02, 0.03, 0.05, 0.1)
P_C = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
POWER_RATE = 0.005
QUICK = dict(sizes=(30, 100, 200), tolerances=(0.03, 0.05), p_c=(0.0, 0.01, 0.05))
# (b, c) at n = 400 for the timing block: a handful of flips, as the certificate usually meets them
TIMED_TABLES = ((0, 0), (2, 2), (5, 0), (6, 2), (8, 2), (12, 4), (3, 9), (20, 2), (25, 25), (29, 10))
TIMED_NEEDED = ((8, 2), (12, 4), (6, 0))


def _worst(test: str, n: int, tol: float, p_cs) -> tuple[float, float]:
    """(largest false-certification probability on the boundary p_b = p_c + tol, the p_c where it is)."""
    best = (-1.0, 0.0)
    for p_c in p_cs:
        if p_c + tol + p_c > 1.0:
            continue
        best = max(best, (stats.certification_probability(p_c + tol, p_c, n, tol, CONFIDENCE, test), p_c))
    return best


def _timing(quick: bool) -> dict:
    tables = TIMED_TABLES[:3] if quick else TIMED_TABLES
    per_table = []
    for b, c in tables:
        stats.clear_caches()
        t0 = time.perf_counter()
        status, bound = status_of(PairedCounts(400 - b - c, b, c, 0), 0.03, CONFIDENCE, "exact")
        per_table.append(
            {"b": b, "c": c, "status": status, "bound": round(bound, 5), "seconds": round(time.perf_counter() - t0, 4)}
        )
    needed = []
    for b, c in TIMED_NEEDED[:1] if quick else TIMED_NEEDED:
        stats.clear_caches()
        t0 = time.perf_counter()
        m = stats.needed_n(b / 400, c / 400, 0.03, CONFIDENCE, 0.8, "exact")
        seconds = round(time.perf_counter() - t0, 3)
        score = stats.needed_n(b / 400, c / 400, 0.03, CONFIDENCE, 0.8, "score")
        needed.append({"b": b, "c": c, "needed_n": m, "score_needed_n": score, "seconds": seconds})
    secs = [r["seconds"] for r in per_table]
    return {
        "n": 400,
        "tolerance": 0.03,
        "tables": per_table,
        "max_seconds": max(secs),
        "mean_seconds": round(sum(secs) / len(secs), 4),
        "needed_n": needed,
    }


def run(*, quick: bool = False) -> dict:
    sizes = QUICK["sizes"] if quick else SIZES
    tolerances = QUICK["tolerances"] if quick else TOLERANCES
    p_cs = QUICK["p_c"] if quick else P_C
    rows = []
    t0 = time.perf_counter()
    for n in sizes:
        for tol in tolerances:
            row = {"n": n, "tolerance": tol}
            for test in ("exact", "score"):
                size, at = _worst(test, n, tol, p_cs)
                row[f"{test}_size"] = round(size, 5)
                row[f"{test}_worst_p_c"] = at
                row[f"{test}_power"] = round(
                    stats.certification_probability(POWER_RATE, POWER_RATE, n, tol, CONFIDENCE, test), 4
                )
            rows.append(row)
    seconds = time.perf_counter() - t0
    return {
        "confidence": CONFIDENCE,
        "alpha": round(1 - CONFIDENCE, 10),
        "gamma": stats.EXACT_GAMMA,
        "p_c_grid": list(p_cs),
        "power_rates": [POWER_RATE, POWER_RATE],
        "rows": rows,
        "exact_max_size": max(r["exact_size"] for r in rows),
        "score_max_size": max(r["score_size"] for r in rows),
        "grid_seconds": round(seconds, 1),
        "timing": _timing(quick),
    }


def markdown(r: dict) -> str:
    a = r["alpha"]
    lines = [
        f"Exact probabilities (trinomial enumeration), confidence {r['confidence']} (nominal false-certification rate "
        f"{a:.0%}). **Size**: the largest probability of certifying a capability whose true drop is exactly the "
        f"tolerance, over positive-flip rates p_c in {{{', '.join(f'{p:g}' for p in r['p_c_grid'])}}} "
        f"(p_b = p_c + tolerance; the rate where it is largest in brackets). **Power**: the probability of "
        f"certifying when p_b = p_c = {r['power_rates'][0]:g} (a model that changed little). Exact: "
        f"`certify.test: exact` (the default; Berger-Boos gamma {r['gamma']:g}); Tango: `certify.test: score`.",
        "",
        "| n | tolerance | exact: size | Tango: size | exact: power | Tango: power |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:

        def size(test, row=row):
            s = row[f"{test}_size"]
            text = f"{s:.2%} ({row[f'{test}_worst_p_c']:g})"
            return f"**{text}**" if s > a + 1e-12 else text

        lines.append(
            f"| {row['n']} | {row['tolerance']:g} | {size('exact')} | {size('score')} "
            f"| {row['exact_power']:.3f} | {row['score_power']:.3f} |"
        )
    lines += [
        "",
        f"Largest size on the grid: exact {r['exact_max_size']:.2%}, Tango {r['score_max_size']:.2%} "
        f"(bold: above the nominal {a:.0%}). The grid took {r['grid_seconds']} s.",
    ]
    t = r.get("timing")
    if t:
        lines += [
            "",
            f"Time of one capability's exact certificate from cold caches (bound, fail-closed decision, "
            f"inconclusive threshold), n = {t['n']}, tolerance {t['tolerance']}: mean {t['mean_seconds']} s, "
            f"max {t['max_seconds']} s over the tables (b, c) = "
            + ", ".join(f"({x['b']}, {x['c']})" for x in t["tables"])
            + ". `needed_n` (exact; Tango's "
            "in brackets), cold: "
            + "; ".join(
                f"({x['b']}, {x['c']}): {x['needed_n']} ({x['score_needed_n']}) in {x['seconds']} s"
                for x in t["needed_n"]
            )
            + ".",
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="size and power of the certificate: exact vs Tango")
    ap.add_argument("--quick", action="store_true", help="a small grid (a smoke run)")
    a = ap.parse_args(argv)
    print(json.dumps(run(quick=a.quick), indent=2))


if __name__ == "__main__":
    main()
