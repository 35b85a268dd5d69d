//! Helpers for precise gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One invalid request field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// Request field path, e.g. `settings.agent.temperature`.
    pub field: String,
    /// The rejected value, as text.
    pub value: String,
    /// The rule broken, e.g. `must be between 0 and 2`.
    pub rule: String,
}

impl FieldViolation {
    /// Builds a violation.
    pub fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        rule: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            value: value.into(),
            rule: rule.into(),
        }
    }
}

/// INVALID_ARGUMENT naming every bad field in the message and in a
/// `google.rpc.BadRequest` detail (one field violation per field, its
/// description `<value>: <rule>`).
pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let message = violations
        .iter()
        .map(|violation| {
            format!(
                "{} = {}: {}",
                violation.field, violation.value, violation.rule
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for violation in violations {
        details.add_bad_request_violation(
            violation.field.clone(),
            format!("{}: {}", violation.value, violation.rule),
        );
    }
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {message}"),
        details,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_every_violation() {
        let status = invalid_argument(&[
            FieldViolation::new("a.b", "3", "must be between 0 and 2"),
            FieldViolation::new("c", "\"\"", "must not be empty"),
        ]);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .contains("a.b = 3: must be between 0 and 2")
        );
        let details = status.get_error_details();
        let bad_request = details.bad_request().unwrap();
        assert_eq!(bad_request.field_violations.len(), 2);
        assert_eq!(bad_request.field_violations[1].field, "c");
    }
}
