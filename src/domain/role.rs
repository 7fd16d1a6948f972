//! User roles and their order: admin > engineer > operator > viewer.

use std::fmt;
use std::str::FromStr;

/// A user's role. The derived order is the privilege order: a role may do everything a lower role
/// may do, so "least role" checks are a single comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads everything that is not a secret.
    Viewer,
    /// Viewer, plus acting on executions (cancel, approve where the runbook allows).
    Operator,
    /// Operator, plus writing runbooks, servers, rules and blackout windows.
    Engineer,
    /// Everything, including users, tokens, system configuration and the audit log.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Engineer, Role::Admin];

    /// The name stored in `users.role` and used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Engineer => "engineer",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may call something that needs at least `least`.
    pub fn allows(self, least: Role) -> bool {
        self >= least
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a role name that is none of the four.
#[derive(Debug, thiserror::Error)]
#[error("unknown role `{0}`: expected one of admin, engineer, operator, viewer")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "engineer" => Ok(Role::Engineer),
            "admin" => Ok(Role::Admin),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_privilege_order() {
        assert!(Role::Admin.allows(Role::Engineer));
        assert!(Role::Engineer.allows(Role::Engineer));
        assert!(!Role::Operator.allows(Role::Engineer));
        assert!(!Role::Viewer.allows(Role::Operator));
    }

    #[test]
    fn names_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("root".parse::<Role>().is_err());
    }
}
