//! The one error type of the Kafka layer. Every variant keeps its cause and says, through
//! [`KafkaError::retryable`], whether trying again can help: a refused record (too large, invalid)
//! or a bad client configuration will fail the same way every time; a broker that is unreachable,
//! a timeout or a failed delivery may succeed later.

use rdkafka::{error::KafkaError as RdKafkaError, types::RDKafkaErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// A client could not be created: its configuration is wrong (not retryable).
    #[error("cannot create {what}: {source}")]
    Client { what: String, source: RdKafkaError },
    /// A request to the cluster failed (metadata, offsets, assignment, consumption).
    #[error("{what}: {source}")]
    Broker { what: String, source: RdKafkaError },
    /// The topic is not in the cluster's metadata.
    #[error("topic {topic} does not exist (create the topics with `payslip-stream topics`)")]
    MissingTopic { topic: String },
    /// Nothing arrived or progressed for too long.
    #[error("{what}: nothing for {seconds} s")]
    Timeout { what: String, seconds: u64 },
    /// The producer refused this record before sending it (for example larger than
    /// `message.max.bytes`): sending it again fails the same way.
    #[error("record for {topic} refused by the producer: {source}")]
    Rejected { topic: String, source: RdKafkaError },
    /// The broker did not confirm the record after the producer's own retries.
    #[error("delivery to {topic} failed: {source}")]
    Delivery { topic: String, source: RdKafkaError },
    /// The producer went away before reporting the delivery.
    #[error("delivery to {topic} was dropped by the producer")]
    Dropped { topic: String },
    /// A position (offset or time) that cannot be used.
    #[error("{0}")]
    Position(String),
    /// No broker of the bootstrap list answered at start-up.
    #[error(
        "no broker at {brokers} answered within {seconds} s: {reason}. Check the address (--brokers, PAYSLIP_BROKERS or kafka.brokers), that the brokers run, and that they accept this client (kafka.librdkafka: security.protocol, sasl.*)"
    )]
    Unreachable { brokers: String, seconds: u64, reason: String },
}

impl KafkaError {
    pub(crate) fn client(what: impl Into<String>) -> impl FnOnce(RdKafkaError) -> Self {
        let what = what.into();
        move |source| KafkaError::Client { what, source }
    }

    pub(crate) fn broker(what: impl Into<String>) -> impl FnOnce(RdKafkaError) -> Self {
        let what = what.into();
        move |source| KafkaError::Broker { what, source }
    }

    /// Whether the same operation may succeed if tried again later.
    pub fn retryable(&self) -> bool {
        match self {
            KafkaError::Client { .. } | KafkaError::MissingTopic { .. } | KafkaError::Position(_) | KafkaError::Rejected { .. } => false,
            KafkaError::Timeout { .. } | KafkaError::Dropped { .. } | KafkaError::Unreachable { .. } => true,
            KafkaError::Broker { source, .. } | KafkaError::Delivery { source, .. } => !is_permanent(source),
        }
    }

    /// The librdkafka error code, when there is one.
    pub fn code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            KafkaError::Client { source, .. } | KafkaError::Broker { source, .. } | KafkaError::Rejected { source, .. } | KafkaError::Delivery { source, .. } => source.rdkafka_error_code(),
            _ => None,
        }
    }

    /// The record is too large for the producer or the broker.
    pub fn is_too_large(&self) -> bool {
        matches!(self.code(), Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize | RDKafkaErrorCode::MessageBatchTooLarge))
    }
}

/// Whether a consumer error means the client cannot go on (authentication or authorisation
/// failed, fenced, or librdkafka's fatal error) rather than a passing broker condition.
pub fn is_fatal_consumer_error(e: &RdKafkaError) -> bool {
    matches!(e, RdKafkaError::MessageConsumptionFatal(_)) || is_permanent(e)
}

/// Codes that describe the request itself, or the client's rights, rather than the cluster's state.
fn is_permanent(e: &RdKafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::InvalidMessage
                | C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication
                | C::InvalidConfig
                | C::InvalidArgument
                | C::Fatal
                | C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::UnsupportedFeature
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_too_large_is_not_retryable_and_a_transport_failure_is() {
        let big = KafkaError::Rejected { topic: "t".into(), source: RdKafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) };
        assert!(!big.retryable());
        assert!(big.is_too_large());
        let down = KafkaError::Delivery { topic: "t".into(), source: RdKafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure) };
        assert!(down.retryable());
        assert!(!down.is_too_large());
        let denied = KafkaError::Delivery { topic: "t".into(), source: RdKafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed) };
        assert!(!denied.retryable());
    }
}
