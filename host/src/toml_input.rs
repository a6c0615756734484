//! Operator-written TOML (manifests, config) with errors that name the key.
//!
//! Syntax errors carry the offending line; type errors carry the key's path
//! (`sampler.interval-ms: invalid type ...`), which `toml`'s own errors lose inside
//! nested tables.

use serde::de::DeserializeOwned;

pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return error.message().to_string();
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line_no = text[..start].matches('\n').count() + 1;
    format!(
        "line {line_no}: {}: `{}`",
        error.message(),
        text[line_start..line_end].trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Inner {
        interval_ms: u64,
    }

    #[test]
    fn type_errors_name_the_key_path() {
        let err = parse::<Outer>("[inner]\ninterval-ms = \"often\"\n").unwrap_err();
        assert!(err.starts_with("inner.interval-ms: invalid type"), "{err}");
    }

    #[test]
    fn syntax_errors_quote_the_line() {
        let err = parse::<Outer>("[inner]\ninterval-ms = = 3\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        assert!(err.contains("interval-ms = = 3"), "{err}");
    }
}
