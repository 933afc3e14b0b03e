//! Built-in guest programs, as machine code.

/// The serial port (COM1).
pub const SERIAL: u16 = 0x3f8;
/// Its line status register.
pub const SERIAL_LSR: u16 = 0x3fd;
/// A write here ends the run.
pub const SHUTDOWN_PORT: u16 = 0x501;
/// The counter workload writes here after printing 4.
pub const CHECKPOINT_PORT: u16 = 0x510;
/// dirty_log guests write here at the end of every pass.
pub const PASS_PORT: u16 = 0x520;

/// The line `hello` prints.
pub const HELLO_LINE: &str = "Hello from mmukit guest";

/// Real mode, loaded at `base`: print the NUL-terminated message after the
/// code on the serial port, then halt.
pub fn hello(base: u16) -> Vec<u8> {
    let message = base + 15;
    let mut code = vec![
        0xbe,
        message as u8,
        (message >> 8) as u8, // mov si, message
        0xba,
        0xf8,
        0x03, // mov dx, 0x3f8
        0xac, // next: lodsb
        0x84,
        0xc0, // test al, al
        0x74,
        0x03, // jz done
        0xee, // out dx, al
        0xeb,
        0xf8, // jmp next
        0xf4, // done: hlt
    ];
    code.extend_from_slice(HELLO_LINE.as_bytes());
    code.extend_from_slice(b"\n\0");
    code
}

/// Real mode: print `0` to `9`, one per line; after `4`, write to the
/// checkpoint port; halt.
pub fn counter() -> Vec<u8> {
    vec![
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb3, 0x30, // mov bl, '0'
        0x88, 0xd8, // loop: mov al, bl
        0xee, // out dx, al
        0xb0, 0x0a, // mov al, '\n'
        0xee, // out dx, al
        0x80, 0xfb, 0x34, // cmp bl, '4'
        0x75, 0x07, // jne skip
        0xba, 0x10, 0x05, // mov dx, 0x510
        0xee, // out dx, al
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xfe, 0xc3, // skip: inc bl
        0x80, 0xfb, 0x3a, // cmp bl, '9' + 1
        0x75, 0xe7, // jne loop
        0xf4, // hlt
    ]
}

/// The dirty_log guest, in 64-bit long mode with paging over all of guest
/// memory. Registers on entry: rsi = first byte of the vCPU's share (a
/// virtual address; the page tables map guest memory in order, past the
/// 4 GiB hole), ebx = pages in it, edx = the pass port, esp = write
/// percentage, eax = the value to write.
///
/// Each pass touches every page of the share: page i is written when
/// `i % 100 < write_percent`, read otherwise; then the guest writes to the
/// pass port (an exit the host waits for) and starts the next pass.
/// (0x40-0x4f are REX prefixes here, so inc and dec take their two-byte
/// forms, and the address registers are 64-bit.)
/// The idle guest: `hlt` in a loop (each halt exits to the VMM, which
/// waits before it runs the vCPU again).
pub fn idle() -> Vec<u8> {
    vec![
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ]
}

/// The dirty-log loop in long mode.
pub fn dirty_loop_64() -> Vec<u8> {
    vec![
        0x48, 0x89, 0xf7, // outer: mov rdi, rsi
        0x89, 0xd9, // mov ecx, ebx
        0x31, 0xed, // xor ebp, ebp
        0x39, 0xe5, // inner: cmp ebp, esp
        0x73, 0x04, // jae read
        0x89, 0x07, // mov [rdi], eax
        0xeb, 0x02, // jmp next
        0x39, 0x07, // read: cmp [rdi], eax
        0xff, 0xc5, // next: inc ebp
        0x83, 0xfd, 0x64, // cmp ebp, 100
        0x72, 0x02, // jb nowrap
        0x31, 0xed, // xor ebp, ebp
        0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // nowrap: add rdi, 4096
        0xff, 0xc9, // dec ecx
        0x75, 0xe2, // jnz inner
        0xee, // out dx, al
        0xff, 0xc0, // inc eax
        0xeb, 0xd6, // jmp outer
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_instruction_starts() {
        // hello: jz at 9 -> 14 (hlt), jmp at 12 -> 6 (lodsb).
        let code = hello(0x1000);
        assert_eq!(code[14], 0xf4);
        assert_eq!(code[6], 0xac);
        assert_eq!((11i32 + code[10] as i8 as i32), 14);
        assert_eq!((14i32 + code[13] as i8 as i32), 6);
        // counter: jne at 14 -> 23 (inc bl), jne at 28 -> 5 (mov al, bl).
        let code = counter();
        assert_eq!(16 + code[15] as i8 as i32, 23);
        assert_eq!(code[23..25], [0xfe, 0xc3]);
        assert_eq!(30 + code[29] as i8 as i32, 5);
        assert_eq!(code[5..7], [0x88, 0xd8]);
        // 64-bit loop: jae at 9 -> 15, jmp at 13 -> 17, jb at 22 -> 26,
        // jnz at 35 -> 7, jmp at 40 -> 0.
        let code = dirty_loop_64();
        assert_eq!(code.len(), 42);
        assert_eq!(11 + code[10] as i8 as i32, 15);
        assert_eq!(15 + code[14] as i8 as i32, 17);
        assert_eq!(24 + code[23] as i8 as i32, 26);
        assert_eq!(37 + code[36] as i8 as i32, 7);
        assert_eq!(42 + code[41] as i8 as i32, 0);
        assert_eq!(code[7..9], [0x39, 0xe5]);
        assert_eq!(code[26..29], [0x48, 0x81, 0xc7]);
    }
}
