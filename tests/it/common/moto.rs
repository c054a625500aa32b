//! A moto S3 server of one test's own, so that the test can kill it and
//! start it again (the shared one of `scripts/test.sh` serves every test
//! at once). moto keeps objects in memory only: with its recorder on
//! (`MOTO_ENABLE_RECORDING`), every request is appended to a file, and
//! [`OwnMoto::restart`] replays that file into the new process, so the
//! store comes back with what it held — as a store that was unreachable
//! for a while does.
//!
//! The Python that runs moto is `PGVAULT_TEST_MOTO_PY` (set by
//! `scripts/test.sh`), else a `python3` that imports `moto.server`.
//! Without one the test is skipped — and fails under `CI=true`.

use std::fs::{self, File};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, S3Server, Scratch};

/// moto's server, with its recorder made to append one request at a time:
/// it writes a request's JSON and its newline in two calls, unlocked, so
/// two large uploads answered at once could land on one line and both be
/// lost at the replay (found as a backup's bundle missing after a restart).
const SERIAL_RECORDER: &str = "\
import sys, threading
from moto.moto_api._internal.recorder.models import Recorder
lock = threading.Lock()
record = Recorder._record_request
def serial(self, *args, **kwargs):
    with lock:
        return record(self, *args, **kwargs)
Recorder._record_request = serial
from moto.server import main
main(sys.argv[1:])
";

pub struct OwnMoto {
    py: String,
    port: u16,
    _scratch: Scratch,
    log: PathBuf,
    recording: PathBuf,
    child: Option<Child>,
    pub server: S3Server,
}

impl OwnMoto {
    /// Starts moto on a free port with a bucket; `None` (skip) when no
    /// Python with moto is found, outside CI.
    pub fn start() -> Option<OwnMoto> {
        let py = match python() {
            Some(py) => py,
            None if super::ci() => {
                panic!("CI=true: no Python with moto (set PGVAULT_TEST_MOTO_PY, or run scripts/test.sh)")
            }
            None => {
                eprintln!(
                    "skipped: no Python with moto (PGVAULT_TEST_MOTO_PY; run scripts/test.sh)"
                );
                return None;
            }
        };
        let scratch = Scratch::new("moto");
        let port = free_port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut m = OwnMoto {
            py,
            port,
            log: scratch.path().join("moto.log"),
            recording: scratch.path().join("recording.jsonl"),
            _scratch: scratch,
            child: None,
            server: S3Server {
                name: "own moto",
                endpoint,
                access_key: "pgvault-test-key".into(),
                secret_key: "pgvault-test-secret".into(),
                region: "us-east-1".into(),
                bucket: "pgvault-own".into(),
                // moto's conditional create is not atomic under races.
                atomic_create: false,
                cloud: super::Cloud::S3,
            },
        };
        m.spawn();
        m.create_bucket();
        Some(m)
    }

    fn create_bucket(&self) {
        self.python(&format!(
            "import boto3\n\
             s3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1',\n\
             aws_access_key_id='k', aws_secret_access_key='s')\n\
             s3.create_bucket(Bucket='{}')\n",
            self.server.endpoint, self.server.bucket
        ));
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open moto's log");
        let child = Command::new(&self.py)
            .args(["-c", SERIAL_RECORDER, "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .env("MOTO_ENABLE_RECORDING", "true")
            .env("MOTO_RECORDER_FILEPATH", &self.recording)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone a file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start moto with {}: {e}", self.py));
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if start.elapsed() > Duration::from_secs(60) {
                panic!(
                    "moto did not listen on {} within 60 s:\n{}",
                    self.port,
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: the store is gone, connections are refused.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and replays what it held.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "moto is running");
        self.drop_torn_recording();
        self.spawn();
        self.python(&format!(
            "import urllib.request\n\
             r = urllib.request.Request('{}/moto-api/recorder/replay-recording', method='POST')\n\
             urllib.request.urlopen(r, timeout=600).read()\n",
            self.server.endpoint
        ));
    }

    /// A SIGKILL can land while moto appends a request to its recording:
    /// the torn last line (a request it never answered) makes its replay
    /// fail with 500 (`json.loads` of every line). Drops that line; a bad
    /// line anywhere else would be a request the store answered and then
    /// forgot, so it fails the test instead.
    fn drop_torn_recording(&self) {
        let Ok(text) = fs::read_to_string(&self.recording) else {
            return;
        };
        let lines: Vec<&str> = text.lines().collect();
        let whole = |l: &str| serde_json::from_str::<serde_json::Value>(l).is_ok();
        if let Some(bad) = lines.iter().rev().skip(1).position(|l| !whole(l)) {
            panic!(
                "moto's recording {}: line {} of {} is not one request",
                self.recording.display(),
                lines.len() - 1 - bad,
                lines.len()
            );
        }
        if lines.last().is_some_and(|l| !whole(l)) {
            let kept: String = lines[..lines.len() - 1]
                .iter()
                .map(|l| format!("{l}\n"))
                .collect();
            fs::write(&self.recording, kept).expect("rewrite moto's recording");
        }
    }

    /// Starts it again on the same port, empty but for the bucket: the
    /// store came back without what it held.
    pub fn restart_empty(&mut self) {
        assert!(self.child.is_none(), "moto is running");
        let _ = fs::remove_file(&self.recording);
        self.spawn();
        self.create_bucket();
    }

    fn python(&self, code: &str) {
        let out = Command::new(&self.py)
            .args(["-c", code])
            .env_remove("AWS_ENDPOINT")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.py));
        assert!(
            out.status.success(),
            "python against moto failed:\n{code}\n{}\n--- moto log\n{}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for OwnMoto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn python() -> Option<String> {
    let candidates = std::env::var("PGVAULT_TEST_MOTO_PY")
        .ok()
        .filter(|p| !p.is_empty())
        .into_iter()
        .chain(["python3".to_string()]);
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import moto.server, boto3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py);
        }
    }
    None
}
