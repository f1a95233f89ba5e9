//! A stack's own Kafka principal: SCRAM-SHA-512 logins and the ACLs that confine them to the
//! stack's topics and consumer groups (both named `<namespace>.<stack>.…`, so one prefixed
//! ACL per resource type and operation covers them, and no other stack's names: stack names
//! and namespaces hold no `.`).
use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::error::ParseResponseErrorCode as _;
use kafka_protocol::messages::alter_user_scram_credentials_request::{
    ScramCredentialDeletion, ScramCredentialUpsertion,
};
use kafka_protocol::messages::create_acls_request::AclCreation;
use kafka_protocol::messages::delete_acls_request::DeleteAclsFilter;
use kafka_protocol::messages::describe_user_scram_credentials_request::UserName;
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, CreateAclsRequest, DeleteAclsRequest, DescribeAclsRequest,
    DescribeUserScramCredentialsRequest,
};
use kafka_protocol::protocol::StrBytes;
use secrecy::{ExposeSecret as _, SecretString};

use super::KafkaCluster;
use super::wire::Connection;
use crate::provision::{ProvisionError, bounded};

/// The mechanism of the stacks' logins.
pub const STACK_MECHANISM: &str = "SCRAM-SHA-512";
/// `ScramMechanism.SCRAM_SHA_512` in the protocol.
const SCRAM_SHA_512: i8 = 2;
/// PBKDF2 rounds of a stored credential (Kafka accepts 4096 to 16384).
const ITERATIONS: u32 = 8192;

// The protocol's codes (org.apache.kafka.common.acl / resource).
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_GROUP: i8 = 3;
const RESOURCE_ANY: i8 = 1;
const PATTERN_PREFIXED: i8 = 4;
const PATTERN_ANY: i8 = 1;
const OPERATION_ANY: i8 = 1;
const OPERATION_READ: i8 = 3;
const OPERATION_WRITE: i8 = 4;
const OPERATION_CREATE: i8 = 5;
const OPERATION_DESCRIBE: i8 = 8;
const PERMISSION_ANY: i8 = 1;
const PERMISSION_ALLOW: i8 = 3;

/// One ACL: a principal may do `operation` on the resources of `resource_type` whose name
/// starts with `prefix`, from any host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Acl {
    /// `User:<name>`.
    pub principal: String,
    /// The protocol's resource type (topic, group).
    pub resource_type: i8,
    /// The name prefix.
    pub prefix: String,
    /// The protocol's operation.
    pub operation: i8,
}

/// What a stack's logins may do: read, write, create and describe its topics (the services
/// create the topics they need if the operator has not yet), read and describe its consumer
/// groups. Nothing on the cluster, nothing of another stack.
pub fn stack_acls(users: &[&str], prefix: &str) -> BTreeSet<Acl> {
    let grants = [
        (RESOURCE_TOPIC, OPERATION_READ),
        (RESOURCE_TOPIC, OPERATION_WRITE),
        (RESOURCE_TOPIC, OPERATION_CREATE),
        (RESOURCE_TOPIC, OPERATION_DESCRIBE),
        (RESOURCE_GROUP, OPERATION_READ),
        (RESOURCE_GROUP, OPERATION_DESCRIBE),
    ];
    users
        .iter()
        .flat_map(|user| {
            grants.iter().map(move |(resource_type, operation)| Acl {
                principal: format!("User:{user}"),
                resource_type: *resource_type,
                prefix: prefix.to_owned(),
                operation: *operation,
            })
        })
        .collect()
}

/// The salted password Kafka stores for a SCRAM-SHA-512 login (RFC 5802's `Hi`, which is
/// PBKDF2-HMAC-SHA-512 with the hash's length).
pub fn salted_password(password: &SecretString, salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(
        password.expose_secret().as_bytes(),
        salt,
        iterations,
        &mut out,
    );
    out
}

fn check(what: &str, code: i16, message: Option<&StrBytes>) -> Result<(), ProvisionError> {
    match code.err() {
        None => Ok(()),
        Some(error) => {
            let hint = if code == 54 {
                " (the brokers have no authorizer: set authorizer.class.name, or \
                 kafka.servicePrincipal: None)"
            } else {
                ""
            };
            Err(ProvisionError::Kafka(format!(
                "{what}: {error}{}{hint}",
                message.map_or_else(String::new, |m| format!(" ({})", m.as_str()))
            )))
        }
    }
}

fn str(value: &str) -> StrBytes {
    StrBytes::from_string(value.to_owned())
}

impl KafkaCluster {
    async fn admin_connection(&self, timeout: Duration) -> Result<Connection, ProvisionError> {
        Connection::open(&self.access, self.tls.as_ref(), timeout).await
    }

    /// Which of `users` have a SCRAM-SHA-512 credential.
    async fn scram_users(
        connection: &mut Connection,
        users: &[&str],
    ) -> Result<BTreeSet<String>, ProvisionError> {
        let request = DescribeUserScramCredentialsRequest::default().with_users(Some(
            users
                .iter()
                .map(|u| UserName::default().with_name(str(u)))
                .collect(),
        ));
        let response = connection.send(request, 0).await?;
        check(
            "describing SCRAM users",
            response.error_code,
            response.error_message.as_ref(),
        )?;
        Ok(response
            .results
            .into_iter()
            .filter(|r| {
                r.error_code == 0
                    && r.credential_infos
                        .iter()
                        .any(|c| c.mechanism == SCRAM_SHA_512)
            })
            .map(|r| r.user.to_string())
            .collect())
    }

    /// Makes sure `login` can sign in with `password` (a new credential when it has none, or
    /// when `set` asks for it) and that `users` hold exactly [`stack_acls`] on `prefix`
    /// (missing ones created; none removed: the operator creates only these). Returns whether
    /// anything changed.
    pub async fn ensure_principal(
        &self,
        users: &[&str],
        login: &str,
        password: &SecretString,
        set: bool,
        prefix: &str,
        timeout: Duration,
    ) -> Result<bool, ProvisionError> {
        bounded("Kafka", timeout, async {
            let mut connection = self.admin_connection(timeout).await?;
            let mut changed = false;
            let exists = Self::scram_users(&mut connection, &[login])
                .await?
                .contains(login);
            if set || !exists {
                let salt: [u8; 32] = rand::random();
                let upsertion = ScramCredentialUpsertion::default()
                    .with_name(str(login))
                    .with_mechanism(SCRAM_SHA_512)
                    .with_iterations(i32::try_from(ITERATIONS).unwrap_or(4096))
                    .with_salt(Bytes::copy_from_slice(&salt))
                    .with_salted_password(Bytes::from(salted_password(
                        password, &salt, ITERATIONS,
                    )));
                let response = connection
                    .send(
                        AlterUserScramCredentialsRequest::default()
                            .with_upsertions(vec![upsertion]),
                        0,
                    )
                    .await?;
                for result in &response.results {
                    check(
                        &format!("setting the SCRAM credential of {login}"),
                        result.error_code,
                        result.error_message.as_ref(),
                    )?;
                }
                changed = true;
            }
            let missing: Vec<Acl> = {
                let existing = Self::acls(&mut connection, users).await?;
                stack_acls(users, prefix)
                    .into_iter()
                    .filter(|acl| !existing.contains(acl))
                    .collect()
            };
            if !missing.is_empty() {
                let creations = missing
                    .iter()
                    .map(|acl| {
                        AclCreation::default()
                            .with_resource_type(acl.resource_type)
                            .with_resource_name(str(&acl.prefix))
                            .with_resource_pattern_type(PATTERN_PREFIXED)
                            .with_principal(str(&acl.principal))
                            .with_host(str("*"))
                            .with_operation(acl.operation)
                            .with_permission_type(PERMISSION_ALLOW)
                    })
                    .collect();
                let response = connection
                    .send(CreateAclsRequest::default().with_creations(creations), 3)
                    .await?;
                for result in &response.results {
                    check(
                        "creating ACLs",
                        result.error_code,
                        result.error_message.as_ref(),
                    )?;
                }
                changed = true;
            }
            Ok(changed)
        })
        .await
    }

    /// The prefixed allow ACLs `users` hold.
    async fn acls(
        connection: &mut Connection,
        users: &[&str],
    ) -> Result<BTreeSet<Acl>, ProvisionError> {
        let mut found = BTreeSet::new();
        for user in users {
            let principal = format!("User:{user}");
            let request = DescribeAclsRequest::default()
                .with_resource_type_filter(RESOURCE_ANY)
                .with_resource_name_filter(None)
                .with_pattern_type_filter(PATTERN_ANY)
                .with_principal_filter(Some(str(&principal)))
                .with_host_filter(None)
                .with_operation(OPERATION_ANY)
                .with_permission_type(PERMISSION_ANY);
            let response = connection.send(request, 3).await?;
            check(
                "describing ACLs",
                response.error_code,
                response.error_message.as_ref(),
            )?;
            for resource in response.resources {
                if resource.pattern_type != PATTERN_PREFIXED {
                    continue;
                }
                for acl in resource.acls {
                    if acl.permission_type == PERMISSION_ALLOW && acl.host.as_str() == "*" {
                        found.insert(Acl {
                            principal: acl.principal.to_string(),
                            resource_type: resource.resource_type,
                            prefix: resource.resource_name.to_string(),
                            operation: acl.operation,
                        });
                    }
                }
            }
        }
        Ok(found)
    }

    /// Removes `users`' SCRAM credentials and every ACL naming them (the stack is gone).
    /// Users or ACLs already gone are not an error.
    pub async fn remove_principal(
        &self,
        users: &[&str],
        timeout: Duration,
    ) -> Result<(), ProvisionError> {
        bounded("Kafka", timeout, async {
            let mut connection = self.admin_connection(timeout).await?;
            let filters = users
                .iter()
                .map(|user| {
                    DeleteAclsFilter::default()
                        .with_resource_type_filter(RESOURCE_ANY)
                        .with_resource_name_filter(None)
                        .with_pattern_type_filter(PATTERN_ANY)
                        .with_principal_filter(Some(str(&format!("User:{user}"))))
                        .with_host_filter(None)
                        .with_operation(OPERATION_ANY)
                        .with_permission_type(PERMISSION_ANY)
                })
                .collect();
            let response = connection
                .send(DeleteAclsRequest::default().with_filters(filters), 3)
                .await?;
            for result in &response.filter_results {
                check(
                    "deleting ACLs",
                    result.error_code,
                    result.error_message.as_ref(),
                )?;
            }
            let present = Self::scram_users(&mut connection, users).await?;
            if present.is_empty() {
                return Ok(());
            }
            let deletions = present
                .iter()
                .map(|user| {
                    ScramCredentialDeletion::default()
                        .with_name(str(user))
                        .with_mechanism(SCRAM_SHA_512)
                })
                .collect();
            let response = connection
                .send(
                    AlterUserScramCredentialsRequest::default().with_deletions(deletions),
                    0,
                )
                .await?;
            for result in &response.results {
                check(
                    &format!("deleting the SCRAM credential of {}", result.user.as_str()),
                    result.error_code,
                    result.error_message.as_ref(),
                )?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_gets_prefixed_grants_on_its_topics_and_groups_and_nothing_else() {
        let acls = stack_acls(&["meridian:ns:a", "meridian:ns:a:b"], "ns.a.");
        assert_eq!(acls.len(), 12, "six grants for each of the two logins");
        assert!(acls.iter().all(|acl| acl.prefix == "ns.a."));
        assert!(
            acls.iter()
                .all(|acl| [RESOURCE_TOPIC, RESOURCE_GROUP].contains(&acl.resource_type)),
            "a grant outside topics and groups: {acls:?}"
        );
        let of = |resource_type| -> BTreeSet<i8> {
            acls.iter()
                .filter(|a| a.principal == "User:meridian:ns:a" && a.resource_type == resource_type)
                .map(|a| a.operation)
                .collect()
        };
        assert_eq!(
            of(RESOURCE_TOPIC),
            BTreeSet::from([
                OPERATION_READ,
                OPERATION_WRITE,
                OPERATION_CREATE,
                OPERATION_DESCRIBE
            ])
        );
        assert_eq!(
            of(RESOURCE_GROUP),
            BTreeSet::from([OPERATION_READ, OPERATION_DESCRIBE])
        );
    }

    #[test]
    fn the_salted_password_is_pbkdf2_hmac_sha512() {
        // The published PBKDF2-HMAC-SHA512 vector for ("password", "salt", 1 round) starts
        // 867f70cf1ade02cf.
        let salted = salted_password(&SecretString::from("password"), b"salt", 1);
        assert_eq!(salted.len(), 64);
        assert_eq!(
            &salted[..8],
            &[0x86, 0x7f, 0x70, 0xcf, 0x1a, 0xde, 0x02, 0xcf]
        );
    }
}
