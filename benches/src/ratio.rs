//! Side-by-side timing of several implementations of one operation, printed
//! as ratios against the first (the baseline).
//!
//! Rounds alternate between the candidates so that frequency changes and
//! noise from the other core hit all of them alike; each candidate's figure
//! is its median round.

use std::hint::black_box;
use std::time::Instant;

/// A named operation: called with a counter, performs one operation.
pub type Op<'a> = Box<dyn FnMut(u64) + 'a>;

/// Candidates for one comparison; the first one added is the baseline.
pub struct SideBySide<'a> {
    title: String,
    candidates: Vec<(String, Op<'a>)>,
}

/// Result of one candidate.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Candidate name.
    pub name: String,
    /// Median nanoseconds per operation.
    pub ns_per_op: f64,
    /// Baseline time divided by this candidate's time (> 1: faster).
    pub speedup: f64,
}

impl<'a> SideBySide<'a> {
    /// A comparison titled `title`.
    pub fn new(title: impl Into<String>) -> Self {
        SideBySide {
            title: title.into(),
            candidates: Vec::new(),
        }
    }

    /// Adds a candidate; the first added is the baseline.
    pub fn add(mut self, name: impl Into<String>, op: impl FnMut(u64) + 'a) -> Self {
        self.candidates.push((name.into(), Box::new(op)));
        self
    }

    /// Runs `rounds` rounds of `ops_per_round` operations per candidate and
    /// prints one line per candidate.
    pub fn run(mut self, ops_per_round: u64, rounds: usize) -> Vec<Figure> {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); self.candidates.len()];
        let mut counter = 0u64;
        for _ in 0..rounds {
            for (i, (_, op)) in self.candidates.iter_mut().enumerate() {
                let start = Instant::now();
                for _ in 0..ops_per_round {
                    op(black_box(counter));
                    counter = counter.wrapping_add(1);
                }
                samples[i].push(start.elapsed().as_nanos() as f64 / ops_per_round as f64);
            }
        }
        let medians: Vec<f64> = samples
            .iter_mut()
            .map(|s| {
                s.sort_by(f64::total_cmp);
                s[s.len() / 2]
            })
            .collect();
        let base = medians[0];
        println!(
            "\n== {} (median of {rounds} rounds × {ops_per_round} ops)",
            self.title
        );
        let figures: Vec<Figure> = self
            .candidates
            .iter()
            .zip(&medians)
            .map(|((name, _), &ns)| Figure {
                name: name.clone(),
                ns_per_op: ns,
                speedup: base / ns,
            })
            .collect();
        for f in &figures {
            println!(
                "  {:<44} {:>12.1} ns/op   {:>8.2}x vs {}",
                f.name, f.ns_per_op, f.speedup, figures[0].name
            );
        }
        figures
    }
}
