//! Text that comes from outside (requests, plugins): the characters a reader of a
//! log line, a file name or another system's screen must not be fooled by.

/// A control character (a newline that forges a log line, a NUL, an escape
/// sequence) or a bidirectional override (which reorders what a reader sees).
pub fn is_hidden_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}
