//! Coordination between every worker of every process of a run: starting a checkpoint,
//! forwarding requests to worker 0, rendezvous with a payload, and failure.
//!
//! It is a small timely dataflow of its own (an input, broadcast, and an operator that
//! files what arrives), built by every worker right after the main one. Control
//! messages therefore travel the same way within a process and between processes, and
//! a worker waiting for the others keeps stepping timely, so the main dataflow keeps
//! moving while it waits: a checkpoint's barriers cannot deadlock with the rounds the
//! workers still have to train before the cut.
//!
//! - [`Message::Start`]: global worker 0 decides that checkpoint `id` is due; every
//!   process's [`Checkpointer`] learns it and its workers join at their next batch.
//! - [`Message::Request`]: a process other than the first got SIGUSR2/SIGTERM or an
//!   admin request (a checkpoint or a GC cycle); only worker 0 starts either, because
//!   both must be stamped into the stream at one place.
//! - [`Message::Stage`]: one worker's part of a rendezvous. [`Coordinator::gather`]
//!   returns once every worker of the cluster has sent its part for the same sequence
//!   number, which makes it a barrier that also carries data (input times, counters).
//! - [`Message::Abort`]: a worker failed; every waiting worker gives up instead of
//!   waiting for it forever.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Input, Inspect};
use timely::dataflow::InputHandle;
use timely::worker::Worker;

use tidepool_pipeline::memory::collector::GcController;

use crate::checkpoint::{Checkpointer, Deposit};

/// What a request asks worker 0 for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Ask {
    Checkpoint,
    GcCycle,
}

/// One worker's contribution to a rendezvous.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Stage {
    /// Joining checkpoint `id` (worker 0's id is the one taken) with this worker's input
    /// time (`None`: never sent anything).
    Join { id: u64, time: Option<u64> },
    /// Past the cut: every round before it is trained here.
    Quiesced,
    /// This worker's part is on disk; what it adds to the manifest.
    Written(Deposit),
    /// The checkpoint is committed (or, from a worker that is not the committer, seen).
    Committed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Message {
    Start(u64),
    Request(Ask),
    Abort,
    Stage { seq: u64, from: usize, stage: Stage },
}

/// Where incoming messages take effect.
#[derive(Clone)]
pub(crate) struct Handlers {
    pub(crate) checkpoints: Option<Arc<Checkpointer>>,
    pub(crate) gc: Arc<GcController>,
    pub(crate) cancel: Arc<AtomicBool>,
}

type Inbox = BTreeMap<u64, Vec<(usize, Stage)>>;

/// A worker's end of the coordination dataflow.
pub(crate) struct Coordinator {
    input: Option<InputHandle<u64, CapacityContainerBuilder<Vec<Message>>>>,
    inbox: Rc<RefCell<Inbox>>,
    index: usize,
    peers: usize,
    next_seq: u64,
}

impl Coordinator {
    /// Builds the coordination dataflow on `worker`. Every worker must call this at the
    /// same point of its dataflow construction.
    pub(crate) fn build(worker: &mut Worker, handlers: Handlers) -> Self {
        let (index, peers) = (worker.index(), worker.peers());
        let inbox = Rc::new(RefCell::new(Inbox::new()));
        let mut input = InputHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let inbox = Rc::clone(&inbox);
            scope.input_from(&mut input).broadcast().inspect(
                move |message: &Message| match message {
                    Message::Start(id) => {
                        if let Some(cp) = &handlers.checkpoints {
                            cp.start(*id);
                        }
                    }
                    Message::Request(ask) if index == 0 => match ask {
                        Ask::Checkpoint => {
                            if let Some(cp) = &handlers.checkpoints {
                                cp.request_flag().store(true, Ordering::Release);
                            }
                        }
                        Ask::GcCycle => handlers.gc.request(),
                    },
                    Message::Request(_) => {}
                    Message::Abort => handlers.cancel.store(true, Ordering::Release),
                    Message::Stage { seq, from, stage } => inbox
                        .borrow_mut()
                        .entry(*seq)
                        .or_default()
                        .push((*from, stage.clone())),
                },
            );
        });
        Self {
            input: Some(input),
            inbox,
            index,
            peers,
            next_seq: 0,
        }
    }

    fn send(&mut self, message: Message) {
        if let Some(input) = self.input.as_mut() {
            input.send(message);
            // Buffered until flushed: nobody would see it while this worker waits.
            input.flush();
        }
    }

    /// Global worker 0 starts checkpoint `id` everywhere.
    pub(crate) fn start(&mut self, id: u64) {
        self.send(Message::Start(id));
    }

    /// Asks global worker 0 for a checkpoint or a GC cycle.
    pub(crate) fn request(&mut self, ask: Ask) {
        self.send(Message::Request(ask));
    }

    /// Tells every worker to give up waiting: this one failed.
    pub(crate) fn abort(&mut self) {
        self.send(Message::Abort);
    }

    /// Sends `stage` and waits, calling `idle` (which steps the worker), until every
    /// worker of the cluster has sent its stage of the same rendezvous; returns them by
    /// worker index. `None` when `idle` gives up (the run is being cancelled).
    pub(crate) fn gather(
        &mut self,
        stage: Stage,
        idle: &mut dyn FnMut() -> bool,
    ) -> Option<Vec<Stage>> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.send(Message::Stage {
            seq,
            from: self.index,
            stage,
        });
        loop {
            {
                let mut inbox = self.inbox.borrow_mut();
                if inbox.get(&seq).is_some_and(|v| v.len() >= self.peers) {
                    let mut stages = inbox.remove(&seq).unwrap_or_default();
                    stages.sort_by_key(|(from, _)| *from);
                    return Some(stages.into_iter().map(|(_, s)| s).collect());
                }
            }
            if !idle() {
                return None;
            }
        }
    }

    /// Closes the input, so the coordination dataflow can complete.
    pub(crate) fn close(&mut self) {
        self.input = None;
    }
}

/// Worker 0 of each process forwards the requests made to its process (signals, admin
/// endpoint) to global worker 0, which polls its own flags directly.
pub(crate) fn forward_requests(
    coord: &mut Coordinator,
    checkpoints: Option<&Checkpointer>,
    gc: &GcController,
) {
    if let Some(cp) = checkpoints {
        if cp.request_flag().swap(false, Ordering::AcqRel) {
            coord.request(Ask::Checkpoint);
        }
    }
    if gc.manual_flag().swap(false, Ordering::AcqRel) {
        coord.request(Ask::GcCycle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tidepool_pipeline::memory::gc::GcConfig;

    /// Three workers gather five times; each sees everyone's stage in worker order, and
    /// nobody passes a rendezvous before all have sent to it.
    #[test]
    fn gather_is_a_barrier_that_carries_data() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        timely::execute(timely::Config::process(3), move |worker| {
            let handlers = Handlers {
                checkpoints: None,
                gc: Arc::new(GcController::new(GcConfig::default(), 3)),
                cancel: Arc::new(AtomicBool::new(false)),
            };
            let mut coord = Coordinator::build(worker, handlers);
            for round in 0..5u64 {
                // Workers arrive at different moments.
                std::thread::sleep(std::time::Duration::from_millis(
                    (worker.index() as u64 * 7 + round * 3) % 11,
                ));
                let time = Some(round * 10 + worker.index() as u64);
                let stages = coord
                    .gather(Stage::Join { id: round, time }, &mut || {
                        worker.step();
                        true
                    })
                    .expect("not cancelled");
                let times: Vec<_> = stages
                    .iter()
                    .map(|s| match s {
                        Stage::Join { time, .. } => time.unwrap_or(u64::MAX),
                        _ => u64::MAX,
                    })
                    .collect();
                s.lock().unwrap().push((worker.index(), times));
            }
            coord.close();
        })
        .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 15);
        for (_, times) in seen.iter() {
            let round = times[0] / 10;
            assert_eq!(*times, vec![round * 10, round * 10 + 1, round * 10 + 2]);
        }
    }

    /// An abort from one worker releases the others' waits.
    #[test]
    fn an_abort_cancels_the_waiting_workers() {
        let gave_up = Arc::new(Mutex::new(0));
        let g = Arc::clone(&gave_up);
        timely::execute(timely::Config::process(2), move |worker| {
            let cancel = Arc::new(AtomicBool::new(false));
            let handlers = Handlers {
                checkpoints: None,
                gc: Arc::new(GcController::new(GcConfig::default(), 2)),
                cancel: Arc::clone(&cancel),
            };
            let mut coord = Coordinator::build(worker, handlers);
            if worker.index() == 1 {
                coord.abort();
            } else {
                let got = coord.gather(Stage::Quiesced, &mut || {
                    worker.step();
                    !cancel.load(Ordering::Acquire)
                });
                assert!(got.is_none());
                *g.lock().unwrap() += 1;
            }
            coord.close();
        })
        .unwrap();
        assert_eq!(*gave_up.lock().unwrap(), 1);
    }
}
