//! Where a task's video comes from (G.2 `videoStreamOptions.url`), and how ffmpeg
//! is told to read it.
//!
//! Each scheme is one variant; a GB/T 28181 receiver (RTP carrying MPEG-PS, which
//! ffmpeg decodes from a pipe with `-f mpeg`) would be one more, feeding the same
//! decoder. Schemes xpud does not read are refused when the task is created.

use std::path::PathBuf;

/// Seconds a network read may stall before ffmpeg gives up (and the pipeline
/// reconnects): a camera that stops sending is a lost source, not a hung task.
const STALL_S: u64 = 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `rtsp://[user:password@]host[:port]/path`, read over TCP (interleaved RTP):
    /// the transport that passes NAT and firewalls and loses no packets.
    Rtsp(String),
    Rtmp(String),
    /// `http(s)://`: a file or a live stream, HLS playlists included.
    Http(String),
    /// `file:///absolute/path`: finite; analysed as fast as the pipeline allows.
    File(PathBuf),
}

impl Source {
    /// Reads a task's URL. The error names the field and says what is read.
    pub fn parse(url: &str) -> Result<Source, String> {
        let field = "taskInfo.streamOptions.videoStreamOptions.url";
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("{field}: {url:?} is not a URL (scheme://...)"));
        };
        if rest.is_empty() {
            return Err(format!("{field}: {scheme}:// names nothing"));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "rtsp" | "rtsps" => Ok(Source::Rtsp(url.to_string())),
            "rtmp" | "rtmps" => Ok(Source::Rtmp(url.to_string())),
            "http" | "https" => Ok(Source::Http(url.to_string())),
            "file" => {
                let path = PathBuf::from(percent_decode(rest));
                if !path.is_absolute() {
                    return Err(format!(
                        "{field}: file URLs name an absolute path (file:///videos/a.mp4)"
                    ));
                }
                Ok(Source::File(path))
            }
            other => Err(format!(
                "{field}: unsupported source {other}://: xpud reads rtsp://, rtmp://, \
                 http(s):// (HLS included) and file:// (GB/T 28181 and GA/T 1400 sources \
                 are not supported yet)"
            )),
        }
    }

    /// A file ends; streams are expected to go on.
    pub fn is_finite(&self) -> bool {
        matches!(self, Source::File(_))
    }

    /// A camera's stream, which goes on at its own pace whether it is read or not.
    /// (An http source may be a file, so it is not taken for one.)
    pub fn is_live(&self) -> bool {
        matches!(self, Source::Rtsp(_) | Source::Rtmp(_))
    }

    /// ffmpeg's input options, `-i` and the input.
    pub fn ffmpeg_input(&self) -> Vec<String> {
        let stall_us = (STALL_S * 1_000_000).to_string();
        let mut args: Vec<String> = Vec::new();
        let input = match self {
            Source::Rtsp(url) => {
                args.extend(["-rtsp_transport".into(), "tcp".into()]);
                // ffmpeg 5.1: the RTSP socket timeout, in microseconds.
                args.extend(["-timeout".into(), stall_us]);
                url.clone()
            }
            Source::Rtmp(url) | Source::Http(url) => {
                args.extend(["-rw_timeout".into(), stall_us]);
                url.clone()
            }
            // `file:` keeps ffmpeg from reading the path as any other protocol.
            Source::File(path) => format!("file:{}", path.display()),
        };
        args.extend(["-i".into(), input]);
        args
    }

    /// The URL with any password replaced, for logs and statuses.
    pub fn redacted(&self) -> String {
        match self {
            Source::Rtsp(url) | Source::Rtmp(url) | Source::Http(url) => redact(url),
            Source::File(path) => format!("file://{}", path.display()),
        }
    }

    /// `text` (an ffmpeg message, which may quote the URL) with this source's
    /// password replaced.
    pub fn scrub(&self, text: &str) -> String {
        match self {
            Source::Rtsp(url) | Source::Rtmp(url) | Source::Http(url) => match password(url) {
                Some(secret) if !secret.is_empty() => text.replace(secret, "***"),
                _ => text.to_string(),
            },
            Source::File(_) => text.to_string(),
        }
    }
}

/// The password in `scheme://user:password@host/...`, if any.
fn password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    userinfo.split_once(':').map(|(_, p)| p)
}

fn redact(url: &str) -> String {
    match password(url) {
        Some(secret) if !secret.is_empty() => url.replacen(&format!(":{secret}@"), ":***@", 1),
        _ => url.to_string(),
    }
}

/// `%XX` escapes decoded; a `%` that starts no escape is kept as it is (as
/// browsers do), and bytes that do not make UTF-8 are replaced.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escape {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_read_or_refused_with_the_field() {
        assert!(matches!(
            Source::parse("rtsp://u:p@10.0.0.1:554/live"),
            Ok(Source::Rtsp(_))
        ));
        assert!(matches!(
            Source::parse("HTTPS://cdn/x.m3u8"),
            Ok(Source::Http(_))
        ));
        assert_eq!(
            Source::parse("file:///videos/a%20b.mp4").unwrap(),
            Source::File("/videos/a b.mp4".into())
        );
        assert_eq!(
            Source::parse("file:///a%zz").unwrap(),
            Source::File("/a%zz".into())
        );
        for (url, says) in [
            (
                "iot://10.172.198.207/?deviceid=1&mode=video",
                "unsupported source iot://",
            ),
            ("gb28181://34020000001320000001", "unsupported source"),
            ("file://relative.mp4", "absolute path"),
            ("camera-7", "not a URL"),
        ] {
            let error = Source::parse(url).unwrap_err();
            assert!(error.contains(says), "{url}: {error}");
            assert!(error.starts_with("taskInfo.streamOptions"), "{error}");
        }
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        let source = Source::parse("rtsp://admin:s3cret@cam/live?x=1").unwrap();
        assert_eq!(source.redacted(), "rtsp://admin:***@cam/live?x=1");
        assert_eq!(
            source.scrub("rtsp://admin:s3cret@cam/live: Connection refused"),
            "rtsp://admin:***@cam/live: Connection refused"
        );
        assert!(source.ffmpeg_input().contains(&"tcp".to_string()));
        let plain = Source::parse("rtsp://cam/live").unwrap();
        assert_eq!(plain.redacted(), "rtsp://cam/live");
    }
}
