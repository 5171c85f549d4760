//! The scenarios, one module each, and how their tasks are collected.

pub mod churn;
pub mod echo;
pub mod fanout;
pub mod fanout_http;
pub mod idle;
pub mod pushpull;
pub mod storm;

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::report::Report;

/// How a spawned task ended.
pub enum Outcome<T> {
    Done(T),
    Failed(String),
    TimedOut,
}

impl<T> Outcome<T> {
    /// The task's value; a panic or timeout is counted as an error in the
    /// report instead.
    pub fn into_done(self, report: &mut Report) -> Option<T> {
        match self {
            Outcome::Done(value) => Some(value),
            Outcome::Failed(why) => {
                report.errors += 1;
                report.sample_error(format!("task failed: {why}"));
                None
            }
            Outcome::TimedOut => {
                report.errors += 1;
                report.sample_error("task did not finish in time and was stopped");
                None
            }
        }
    }
}

impl Outcome<Vec<String>> {
    /// Counts the task's errors (or its failure) in the report.
    pub fn add_to(self, report: &mut Report) {
        if let Some(errors) = self.into_done(report) {
            report.errors += errors.len() as u64;
            for e in errors {
                report.sample_error(e);
            }
        }
    }
}

/// Awaits every task, all within `within`; tasks still running then are
/// aborted.
pub async fn collect<T>(tasks: Vec<JoinHandle<T>>, within: Duration) -> Vec<Outcome<T>> {
    let deadline = Instant::now() + within;
    let mut outcomes = Vec::with_capacity(tasks.len());
    for mut task in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        outcomes.push(match tokio::time::timeout(left, &mut task).await {
            Ok(Ok(value)) => Outcome::Done(value),
            Ok(Err(e)) => Outcome::Failed(e.to_string()),
            Err(_) => {
                task.abort();
                Outcome::TimedOut
            }
        });
    }
    outcomes
}
