//! Partial updates (`PATCH`): a field left out keeps its value, a value replaces it, and `null`
//! clears it, where the column may be empty. Such fields are `MaybeUndefined` and declared
//! `nullable` in the document; the others are refused when sent as `null`, so that a client
//! that means to clear one is told it cannot, rather than seeing nothing change.
//!
//! In create and replace bodies (`POST`, `PUT`) an optional field sent as `null` is the same as
//! leaving it out, and the document declares those fields `nullable`.

use poem_openapi::types::MaybeUndefined;

use super::error::ApiError;

/// What a partial update does to one column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<T> {
    /// Left out: the column keeps its value.
    Keep,
    /// `null`: the column is emptied.
    Clear,
    /// The new value.
    Set(T),
}

impl<T> Change<T> {
    /// The change of a field whose column may be empty.
    pub fn of(field: MaybeUndefined<T>) -> Change<T> {
        match field {
            MaybeUndefined::Undefined => Change::Keep,
            MaybeUndefined::Null => Change::Clear,
            MaybeUndefined::Value(v) => Change::Set(v),
        }
    }

    /// The column's new content given its current one.
    pub fn apply(self, current: Option<T>) -> Option<T> {
        match self {
            Change::Keep => current,
            Change::Clear => None,
            Change::Set(v) => Some(v),
        }
    }

    /// Whether the update touches the column.
    pub fn is_given(&self) -> bool {
        !matches!(self, Change::Keep)
    }

    /// The change with `f` applied to its value.
    pub fn map_set<U>(self, f: impl FnOnce(T) -> U) -> Change<U> {
        match self {
            Change::Keep => Change::Keep,
            Change::Clear => Change::Clear,
            Change::Set(v) => Change::Set(f(v)),
        }
    }

    /// As the store layer takes it: `None` keeps, `Some(None)` clears, `Some(Some(v))` sets.
    pub fn into_option(self) -> Option<Option<T>> {
        match self {
            Change::Keep => None,
            Change::Clear => Some(None),
            Change::Set(v) => Some(Some(v)),
        }
    }

    /// The change with its value borrowed.
    pub fn as_ref(&self) -> Change<&T> {
        match self {
            Change::Keep => Change::Keep,
            Change::Clear => Change::Clear,
            Change::Set(v) => Change::Set(v),
        }
    }
}

/// The new value of field `name` whose column cannot be empty: `None` when left out; `null` is
/// refused with 422 naming the field.
pub fn required_value<T>(name: &str, field: MaybeUndefined<T>) -> Result<Option<T>, ApiError> {
    match field {
        MaybeUndefined::Undefined => Ok(None),
        MaybeUndefined::Null => Err(ApiError::invalid(
            name,
            "must not be null: it cannot be cleared (leave it out to keep the current value)",
        )),
        MaybeUndefined::Value(v) => Ok(Some(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_out_keeps_null_clears_a_value_sets() {
        assert_eq!(
            Change::of(MaybeUndefined::Undefined).apply(Some(1)),
            Some(1)
        );
        assert_eq!(Change::<i32>::of(MaybeUndefined::Null).apply(Some(1)), None);
        assert_eq!(Change::of(MaybeUndefined::Value(2)).apply(Some(1)), Some(2));
        assert!(!Change::<i32>::Keep.is_given());
        assert!(Change::<i32>::Clear.is_given());
    }

    #[test]
    fn null_is_refused_where_the_column_cannot_be_empty() {
        assert_eq!(
            required_value("port", MaybeUndefined::Value(22)).ok(),
            Some(Some(22))
        );
        assert_eq!(
            required_value::<i32>("port", MaybeUndefined::Undefined).ok(),
            Some(None)
        );
        match required_value::<i32>("port", MaybeUndefined::Null) {
            Err(ApiError::Unprocessable(body)) => {
                let details = body.0.details.expect("names the field");
                assert_eq!(details.field.as_deref(), Some("port"));
                let reason = details.reason.unwrap_or_default();
                assert!(reason.contains("must not be null"), "{reason}");
            }
            other => panic!("null accepted for a column that cannot be empty: {other:?}"),
        }
    }
}
