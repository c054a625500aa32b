//! Bounded parallelism on blocking threads, shared by backup and restore:
//! one worker per state, each taking items from a shared source until it
//! ends. The source is an iterator (pages of a scratch table: nothing holds
//! every item, issue 14); an error from it, or the first error of a worker,
//! ends the source so the other workers stop soon, and is the one
//! returned.

use std::sync::{Arc, Mutex};

use crate::error::Result;

/// Runs one blocking worker per element of `states` over `items`, in their
/// order. `work` handles one item; `finish` turns a worker's state into its
/// result once the source has ended.
pub(crate) async fn run<I, T, S, R, W, F>(
    items: I,
    states: Vec<S>,
    work: W,
    finish: F,
) -> Result<Vec<R>>
where
    I: Iterator<Item = Result<T>> + Send + 'static,
    T: Send + 'static,
    S: Send + 'static,
    R: Send + 'static,
    W: Fn(&mut S, T) -> Result<()> + Send + Sync + 'static,
    F: Fn(S) -> Result<R> + Send + Sync + 'static,
{
    let queue = Arc::new(Mutex::new(Some(items)));
    let work = Arc::new(work);
    let finish = Arc::new(finish);
    let mut tasks = Vec::new();
    for mut state in states {
        let (queue, work, finish) = (queue.clone(), work.clone(), finish.clone());
        tasks.push(tokio::task::spawn_blocking(move || -> Result<R> {
            loop {
                let next = {
                    let mut q = queue.lock().expect("queue lock is never poisoned");
                    let next = q.as_mut().and_then(Iterator::next);
                    if !matches!(next, Some(Ok(_))) {
                        *q = None;
                    }
                    next
                };
                let done = match next {
                    None => return finish(state),
                    Some(item) => item.and_then(|item| work(&mut state, item)),
                };
                if let Err(e) = done {
                    *queue.lock().expect("queue lock is never poisoned") = None;
                    return Err(e);
                }
            }
        }));
    }
    let mut results = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t.await? {
            Ok(r) => results.push(r),
            Err(e) => {
                *queue.lock().expect("queue lock is never poisoned") = None;
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(results),
    }
}
