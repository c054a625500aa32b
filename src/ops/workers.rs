//! Bounded parallelism on blocking threads, shared by backup and restore:
//! one worker per state, each taking items from a shared queue until it is
//! empty. The first error empties the queue so the other workers stop soon,
//! and is the one returned.

use std::sync::{Arc, Mutex};

use crate::error::Result;

/// Runs one blocking worker per element of `states` over `items`, taken
/// from the end (put the item to start first last). `work` handles one
/// item; `finish` turns a worker's state into its result once the queue is
/// empty.
pub(crate) async fn run<T, S, R, W, F>(
    items: Vec<T>,
    states: Vec<S>,
    work: W,
    finish: F,
) -> Result<Vec<R>>
where
    T: Send + 'static,
    S: Send + 'static,
    R: Send + 'static,
    W: Fn(&mut S, T) -> Result<()> + Send + Sync + 'static,
    F: Fn(S) -> Result<R> + Send + Sync + 'static,
{
    let queue = Arc::new(Mutex::new(items));
    let work = Arc::new(work);
    let finish = Arc::new(finish);
    let mut tasks = Vec::new();
    for mut state in states {
        let (queue, work, finish) = (queue.clone(), work.clone(), finish.clone());
        tasks.push(tokio::task::spawn_blocking(move || -> Result<R> {
            loop {
                let next = queue.lock().expect("queue lock is never poisoned").pop();
                let Some(item) = next else {
                    return finish(state);
                };
                work(&mut state, item)?;
            }
        }));
    }
    let mut results = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t.await? {
            Ok(r) => results.push(r),
            Err(e) => {
                queue.lock().expect("queue lock is never poisoned").clear();
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(results),
    }
}
