//! `exporter`: serves `info`'s metrics on `/metrics` over HTTP.
//!
//! The repository is read on an interval (`exporter-refresh`, 10 s at
//! least), never per scrape: a scrape is answered from the last report,
//! with ages computed at the scrape. A failed refresh keeps the last good
//! report and says so (`pgvault_up 0`, the refresh counters).
//!
//! HTTP is a small hand-written HTTP/1.1 responder on tokio: one request
//! per connection (`Connection: close`), `GET`/`HEAD` of `/metrics` and
//! `/`, a bounded request head read with a timeout, a bounded number of
//! connections at once. That is all a Prometheus scrape needs, and it
//! spares the build a server stack (hyper, its http crates) for one
//! static body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, Semaphore};

use crate::error::{Error, Result};
use crate::ops::info::{self, InfoOptions, InfoReport};
use crate::ops::metrics::{self, Families};
use crate::repo::Repository;

#[derive(Debug, Clone)]
pub struct ExporterOptions {
    pub listen: SocketAddr,
    pub refresh: Duration,
    pub info: InfoOptions,
}

/// What scrapes are answered from.
#[derive(Default)]
struct Cache {
    report: Option<InfoReport>,
    refreshes: u64,
    failures: u64,
    last_ok: bool,
    last_refresh: Option<DateTime<Utc>>,
    last_success: Option<DateTime<Utc>>,
    last_duration: f64,
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 16;
const MAX_REQUEST_HEAD: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `listen`, reads the repository once, then serves until dropped.
pub async fn serve(repo: &Repository, opts: &ExporterOptions) -> Result<()> {
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| Error::usage(format!("listen on {}: {e}", opts.listen)))?;
    log::info!(
        "exporter: serving http://{}/metrics, reading the repository every {}s",
        listener.local_addr().unwrap_or(opts.listen),
        opts.refresh.as_secs()
    );
    let cache = Arc::new(RwLock::new(Cache::default()));
    refresh(repo, &opts.info, &cache).await;
    tokio::select! {
        () = refresh_loop(repo, opts, &cache) => Ok(()),
        r = accept_loop(&listener, repo, &cache) => r,
    }
}

async fn refresh_loop(repo: &Repository, opts: &ExporterOptions, cache: &Arc<RwLock<Cache>>) {
    loop {
        tokio::time::sleep(opts.refresh).await;
        refresh(repo, &opts.info, cache).await;
    }
}

/// Reads the repository (the one place the exporter does), logging one
/// line per refresh.
async fn refresh(repo: &Repository, opts: &InfoOptions, cache: &Arc<RwLock<Cache>>) {
    let t = Instant::now();
    let r = info::info(repo, opts).await;
    let secs = t.elapsed().as_secs_f64();
    let mut c = cache.write().await;
    c.refreshes += 1;
    c.last_refresh = Some(Utc::now());
    c.last_duration = secs;
    match r {
        Ok(report) => {
            log::info!(
                "exporter: refresh {}: read stanza {} of {} in {secs:.2}s",
                c.refreshes,
                repo.stanza(),
                repo.describe()
            );
            c.report = Some(report);
            c.last_ok = true;
            c.last_success = c.last_refresh;
        }
        Err(e) => {
            log::warn!("exporter: refresh {}: {e}", c.refreshes);
            c.failures += 1;
            c.last_ok = false;
        }
    }
}

async fn accept_loop(
    listener: &TcpListener,
    repo: &Repository,
    cache: &Arc<RwLock<Cache>>,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::internal(format!("exporter: {e}")))?;
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("exporter: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (cache, stanza, described) =
            (cache.clone(), repo.stanza().to_string(), repo.describe());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &cache, &stanza, &described).await {
                log::debug!("exporter: {peer}: {e}");
            }
            drop(permit);
        });
    }
}

/// Answers one request.
async fn handle(
    mut stream: TcpStream,
    cache: &RwLock<Cache>,
    stanza: &str,
    repo: &str,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => {
            return respond(&mut stream, 400, "text/plain", b"bad request\n", false).await
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    };
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            405,
            "text/plain",
            b"only GET and HEAD\n",
            false,
        )
        .await;
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let body = render(&*cache.read().await, stanza, repo);
            respond(&mut stream, 200, CONTENT_TYPE, body.as_bytes(), head_only).await
        }
        "/" => {
            respond(
                &mut stream,
                200,
                "text/plain; charset=utf-8",
                b"pgvault exporter: metrics at /metrics\n",
                head_only,
            )
            .await
        }
        _ => respond(&mut stream, 404, "text/plain", b"not found\n", head_only).await,
    }
}

/// The request line, once the whole head (up to the blank line) is in;
/// `None` for a head that is too long or not HTTP.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or("").to_string();
    Ok(line.ends_with("HTTP/1.1") || line.ends_with("HTTP/1.0")).map(|ok| ok.then_some(line))
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes()).await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

/// The metrics of the last report (ages as of now) and the exporter's own.
fn render(c: &Cache, stanza: &str, repo: &str) -> String {
    let now = Utc::now();
    let mut m = match &c.report {
        Some(r) => metrics::families(r, &now),
        None => Families::new(stanza, repo),
    };
    // The report's own `pgvault_up` says it was read; the exporter's says
    // whether the last read worked.
    m.list.retain(|f| f.name != "pgvault_up");
    let ts = |t: &Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros() as f64 / 1e6);
    m.gauge(
        "pgvault_up",
        "1: the exporter's last read of the repository worked",
        &[],
        Some(if c.last_ok { 1.0 } else { 0.0 }),
    );
    m.counter(
        "pgvault_exporter_refreshes",
        "Reads of the repository since the exporter started",
        Some(c.refreshes as f64),
    );
    m.counter(
        "pgvault_exporter_refresh_failures",
        "Reads of the repository that failed",
        Some(c.failures as f64),
    );
    m.gauge(
        "pgvault_exporter_last_refresh_timestamp_seconds",
        "When the repository was last read",
        &[],
        ts(&c.last_refresh),
    );
    m.gauge(
        "pgvault_exporter_last_success_timestamp_seconds",
        "When the repository was last read successfully",
        &[],
        ts(&c.last_success),
    );
    m.gauge(
        "pgvault_exporter_last_refresh_duration_seconds",
        "How long the last read took",
        &[],
        Some(c.last_duration),
    );
    m.encode()
}
