//! Text that is stored as text. PostgreSQL's `text` cannot hold U+0000
//! (NUL), SQLite's can: a string from a client or a peer that reaches a
//! text column passes here first, so both backends give the same answer
//! (`400 M_INVALID_PARAM`, the answer PostgreSQL's refusal is turned into)
//! instead of SQLite storing what PostgreSQL refuses. Event content is
//! JSON and keeps a NUL as the escape `\u0000`: it is not checked.

use weft_core::{Error, Result};

/// Refuses `text` (named `what` in the error) when it holds a NUL.
pub fn check_text(what: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::invalid_param(format!("{what} may not contain NUL characters")));
    }
    Ok(())
}

/// [`check_text`] for an optional value.
pub fn check_opt_text(what: &str, text: Option<&str>) -> Result<()> {
    text.map_or(Ok(()), |t| check_text(what, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_refused_anywhere_and_nothing_else() {
        for bad in ["\0", "a\0", "\0b", "a\0b"] {
            let e = check_text("Display name", bad).unwrap_err();
            assert_eq!(e.kind, weft_core::ErrorKind::InvalidParam);
            assert!(e.message.contains("Display name"), "{}", e.message);
        }
        for good in ["", "a", "\u{1}", "é", "\\u0000"] {
            check_text("x", good).unwrap();
        }
        check_opt_text("x", None).unwrap();
        assert!(check_opt_text("x", Some("\0")).is_err());
    }
}
