//! Timing with medians, side by side: one function alone ([`measure`]), several in rounds of
//! blocks ([`measure_blocks`]) or two alternating call by call ([`measure_pair`]), so that the
//! ratios `taskpack bench` reports are measured under the same load.

use std::time::{Duration, Instant};

use anyhow::Result;

/// Median time of `f` over repetitions filling `budget` (at least 5, at most 10 000), after one
/// warm-up call.
pub(super) fn measure(budget: Duration, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    f()?;
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 5 || (started.elapsed() < budget && times.len() < 10_000) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort_unstable();
    Ok(times.get(times.len() / 2).copied().unwrap_or_default())
}

/// Median times of each function of `fs`, each given a time budget, measured in `rounds` rounds
/// of blocks: in every round, each function runs for its budget / `rounds` (at least twice) before
/// the next one starts. One warm-up call of each comes first. Blocks keep each measurement's cache
/// state to itself (e.g. a tract model load evicts the bundle from the CPU caches, which doubles
/// the cold switch on the small demo model if the two alternate call by call), while the rounds
/// spread load from other processes that changes during the run over all of them alike, so that
/// their ratios are measured side by side.
pub(super) fn measure_blocks(
    rounds: u32,
    fs: &mut [(Duration, &mut dyn FnMut() -> Result<()>)],
) -> Result<Vec<Duration>> {
    let mut times: Vec<Vec<Duration>> = fs.iter().map(|_| Vec::new()).collect();
    for (_, f) in fs.iter_mut() {
        f()?;
    }
    for _ in 0..rounds.max(1) {
        for ((budget, f), times) in fs.iter_mut().zip(&mut times) {
            let block = *budget / rounds.max(1);
            let started = Instant::now();
            let mut n = 0;
            while n < 2 || (started.elapsed() < block && n < 10_000) {
                let t = Instant::now();
                f()?;
                times.push(t.elapsed());
                n += 1;
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut v| {
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or_default()
        })
        .collect())
}

/// Median times of `a` and `b` called alternately, in alternating order (so that load from other
/// processes and cache effects hit both alike), over repetitions filling `budget`, after one warm-up call of each.
pub(super) fn measure_pair(
    budget: Duration,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(Duration, Duration)> {
    a()?;
    b()?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    let started = Instant::now();
    while ta.len() < 6 || (started.elapsed() < budget && ta.len() < 10_000) {
        // Alternate which goes first, so neither always runs on the other's cache state.
        let a_first = ta.len() % 2 == 0;
        for first in [a_first, !a_first] {
            let t = Instant::now();
            if first {
                a()?;
                ta.push(t.elapsed());
            } else {
                b()?;
                tb.push(t.elapsed());
            }
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    Ok((median(ta), median(tb)))
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(super) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub(super) fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::NAN
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}
